CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT, c REAL);
WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < 150000)
INSERT INTO t SELECT i, printf('%08x-%s', (i * 2654435761) % 4294967296,
                               substr('abcdefghijklmnopqrstuvwxyz', 1 + i % 26, 1 + i % 17)), i * 0.5 FROM r;
CREATE INDEX tb ON t(b);
SELECT count(*), sum(length(b)), sum(c) FROM t;
SELECT b FROM t ORDER BY b LIMIT 5;
SELECT substr(b, 1, 1) AS k, count(*), max(a) FROM t GROUP BY k ORDER BY k;
UPDATE t SET b = b || b WHERE a % 3 = 0;
DELETE FROM t WHERE a % 5 = 0;
VACUUM;
SELECT count(*), sum(length(b)), group_concat(a) FROM (SELECT a, b FROM t WHERE b LIKE '%xyz%' ORDER BY b LIMIT 20);
