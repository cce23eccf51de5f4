// C++ on libanyalloc.so: new/delete (sized and aligned), containers,
// exceptions (allocated with malloc by the runtime), threads.
#include <malloc.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

struct alignas(256) Wide {
    unsigned char bytes[300];
};

char *volatile sink;

static size_t container_work(int t) {
    std::map<int, std::string> m;
    std::vector<std::unique_ptr<std::vector<int>>> v;
    for (int i = 0; i < 20000; i++) {
        m[i % 5000] = std::to_string(i * (t + 1)) + std::string(i % 40, 'y');
        v.push_back(std::make_unique<std::vector<int>>(i % 100, i));
        if (v.size() > 500) v.erase(v.begin(), v.begin() + 250);
    }
    size_t s = 0;
    for (auto &kv : m) s += kv.second.size() * (kv.first + 1);
    for (auto &p : v) s += p->size();
    return s;
}

int main() {
    int failures = 0;
    auto check = [&](bool ok, const char *what) {
        if (!ok) {
            std::printf("FAIL: %s\n", what);
            failures++;
        }
    };
    char *p = new char[100];
    check(malloc_usable_size(p) == 112, "new[] comes from anyalloc");
    delete[] p;
    auto *w = new Wide;
    check(reinterpret_cast<std::uintptr_t>(w) % 256 == 0, "aligned new");
    delete w;
    auto *ws = new Wide[10];
    check(reinterpret_cast<std::uintptr_t>(ws) % 256 == 0, "aligned new[]");
    delete[] ws;
    try {
        volatile size_t huge = SIZE_MAX / 4; // not a constant: the compiler would refuse
        sink = new char[huge];              // kept: an unused new may be elided
        check(false, "huge new throws");
    } catch (const std::bad_alloc &) {
    }
    int caught = 0;
    for (int i = 0; i < 1000; i++) {
        try {
            throw std::runtime_error(std::string(100 + i % 50, 'x'));
        } catch (const std::runtime_error &e) {
            caught += e.what()[0] == 'x';
        }
    }
    check(caught == 1000, "exceptions");
    std::vector<std::thread> threads;
    std::vector<size_t> sums(4);
    for (int t = 0; t < 4; t++) threads.emplace_back([t, &sums] { sums[t] = container_work(t); });
    for (auto &t : threads) t.join();
    bool same = true;
    for (int t = 0; t < 4; t++) same = same && sums[t] == container_work(t);
    check(same, "threads with containers compute what one thread does");
    std::printf("cxx: %s\n", failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
