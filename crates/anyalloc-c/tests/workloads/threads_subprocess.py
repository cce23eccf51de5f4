# Heavy allocation from four threads (dicts, lists, strings, bytearrays),
# then a subprocess (which inherits LD_PRELOAD). Deterministic output.
import hashlib
import json
import subprocess
import sys
import threading


def work(seed):
    d = {}
    for i in range(100000):
        k = "k%d" % ((i * 7919 + seed) % 40000)
        d[k] = [i, str(i) * ((i % 7) + 1), {"x": i, "y": "v" * (i % 300)}]
        if i % 3 == 0:
            d.pop("k%d" % ((i * 31) % 40000), None)
    blob = json.dumps(sorted(d.items())[:3000])
    big = [bytearray(1000 + (i * 37) % 60000) for i in range(3000)]
    return "%s %d %d" % (hashlib.sha256(blob.encode()).hexdigest()[:16], len(d), sum(map(len, big)))


results = [None] * 4
threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, work(i))) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
child = subprocess.run(
    [sys.executable, "-c",
     "import sys, hashlib; d = sys.stdin.read(); print(len(d), hashlib.sha256(d.encode()).hexdigest()[:16])"],
    input="\n".join(results) * 2000, capture_output=True, text=True, check=True)
print("\n".join(results))
print("child:", child.stdout.strip())
