"""Spam filtering benchmark (issue 9): accuracy and speed; prints one JSON line.

    .venv/bin/python bench/spam.py [--corpus DIR] [--no-spamassassin] [--jobs N]

On the SpamAssassin public corpus split in ``CORPUS/spam-ham/{train,test}``:

* **coffer**: the built-in scorer (heuristics + the classifier, no DNS, no external
  scanner) trained on the train split with the same code as ``coffer spam
  train``, then every test message scored as ``coffer spam score`` does; a
  message is called spam when its verdict is spam (score >= the quarantine
  threshold, 6 by default).  ``msgs_per_s`` is the scoring rate of one process on
  one core (parse, heuristics, classifier; the files already read).
* **spamassassin** (when installed): Debian's SpamAssassin, network tests off
  (spamd ``-L``), its Bayes trained on the same train split with ``sa-learn``
  into a temporary directory, each test message scored with ``spamc`` against a
  spamd on loopback; spam when SpamAssassin says so (score >= 5, its default).

For each: precision, recall (of spam), F1, false-positive rate (ham called spam)
and the counts.  The machine is shared: speed figures vary from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.check.spam.bayes import TokenStore  # noqa: E402
from gateway.check.spam.scorer import Scorer  # noqa: E402


def _corpus(arg: str | None) -> Path | None:
    path = Path(arg or os.environ.get("COFFER_CORPUS") or REPO.parent / "shared" / "corpus")
    split = path / "spam-ham"
    return split if (split / "train").is_dir() and (split / "test").is_dir() else None


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file())


def metrics(ham_flags: list[bool], spam_flags: list[bool]) -> dict[str, Any]:
    """Flags are "called spam"; spam is the positive class."""
    tp = sum(spam_flags)
    fn = len(spam_flags) - tp
    fp = sum(ham_flags)
    tn = len(ham_flags) - fp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "fp_rate": round(fp / (fp + tn), 4) if fp + tn else 0.0,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def run_coffer(split: Path, tmp: Path) -> dict[str, Any]:
    scorer = Scorer(store=TokenStore(tmp / "bayes.sqlite"))
    train = [(p.read_bytes(), False) for p in _files(split / "train" / "ham")]
    train += [(p.read_bytes(), True) for p in _files(split / "train" / "spam")]
    started = time.perf_counter()
    scorer.learn(train)
    train_s = time.perf_counter() - started
    scorer.store.model()  # type: ignore[union-attr]  # load the tokens before timing
    test_ham = [p.read_bytes() for p in _files(split / "test" / "ham")]
    test_spam = [p.read_bytes() for p in _files(split / "test" / "spam")]
    started = time.process_time()
    wall = time.perf_counter()
    ham_flags = [scorer.score(m).verdict == "spam" for m in test_ham]
    spam_flags = [scorer.score(m).verdict == "spam" for m in test_spam]
    cpu = time.process_time() - started
    wall = time.perf_counter() - wall
    scorer.close()
    n = len(test_ham) + len(test_spam)
    return {**metrics(ham_flags, spam_flags), "train_s": round(train_s, 1),
            "msgs_per_s": round(n / cpu, 1), "msgs_per_s_wall": round(n / wall, 1)}


# -- SpamAssassin ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _site_config(tmp: Path) -> Path:
    """/etc/spamassassin (plugins, Debian defaults) plus a Bayes database in ``tmp``."""
    site = tmp / "site"
    shutil.copytree("/etc/spamassassin", site, ignore=shutil.ignore_patterns("sa-update*"))
    with open(site / "zz_bench.cf", "w") as f:
        f.write(f"bayes_path {tmp / 'bayes' / 'bayes'}\nuse_bayes 1\nbayes_auto_learn 0\n"
                "bayes_file_mode 0777\nuse_auto_whitelist 0\n")
    (tmp / "bayes").mkdir()
    (tmp / "bayes").chmod(0o777)
    return site


def run_spamassassin(split: Path, tmp: Path, jobs: int) -> dict[str, Any] | str:
    spamd = shutil.which("spamd") or "/usr/sbin/spamd"
    spamc, salearn = shutil.which("spamc"), shutil.which("sa-learn")
    if not (Path(spamd).exists() and spamc and salearn):
        return "not installed (apt-get install spamassassin spamd spamc)"
    tmp.chmod(0o755)
    site = _site_config(tmp)
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    started = time.perf_counter()
    for kind in ("ham", "spam"):
        # -L: local only (no network tests); --no-sync then one sync at the end
        subprocess.run([salearn, "-L", f"--siteconfigpath={site}", f"--{kind}", "--no-sync",
                        str(split / "train" / kind)], check=True, capture_output=True)
    subprocess.run([salearn, f"--siteconfigpath={site}", "--sync"], check=True,
                   capture_output=True)
    subprocess.run(["chmod", "-R", "a+rwX", str(tmp / "bayes")], check=True)
    train_s = time.perf_counter() - started
    port = _free_port()
    with open(tmp / "spamd.log", "wb") as log:
        proc = subprocess.Popen(
            [spamd, "-L", "-x", f"--siteconfigpath={site}", "--listen", f"127.0.0.1:{port}",
             "--max-children", str(jobs), "--min-children", str(jobs), "--syslog", "stderr",
             *user], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    return "spamd did not start: " + (tmp / "spamd.log").read_text()[-300:]
                time.sleep(0.2)

        def is_spam(path: Path) -> bool:
            for attempt in range(5):
                with open(path, "rb") as f:
                    # -c: print score/threshold, exit 1 when spam; -x: an error is an
                    # error, not silently "ham"
                    r = subprocess.run([spamc, "-d", "127.0.0.1", "-p", str(port), "-c",
                                        "-x", "-s", "10000000"], stdin=f, capture_output=True)
                if r.returncode in (0, 1):
                    return r.returncode == 1
                time.sleep(0.2 * (attempt + 1))  # spamd respawning a child: try again
            raise RuntimeError(f"spamc failed on {path}: exit {r.returncode} {r.stderr!r}")

        wall = time.perf_counter()
        with ThreadPoolExecutor(jobs) as pool:
            ham_flags = list(pool.map(is_spam, _files(split / "test" / "ham")))
            spam_flags = list(pool.map(is_spam, _files(split / "test" / "spam")))
        wall = time.perf_counter() - wall
    finally:
        proc.terminate()
        proc.wait(30)
    n = len(ham_flags) + len(spam_flags)
    # How many verdicts SpamAssassin's Bayes took part in (it needs 200 of each class)
    results = [ln for ln in (tmp / "spamd.log").read_text(errors="replace").splitlines()
               if "spamd: result:" in ln]
    with_bayes = sum("BAYES_" in ln for ln in results)
    return {**metrics(ham_flags, spam_flags), "train_s": round(train_s, 1),
            "msgs_per_s_wall": round(n / wall, 1), "children": jobs,
            "bayes_used": round(with_bayes / len(results), 3) if results else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", help="corpus root (default: $COFFER_CORPUS or ../shared/corpus)")
    ap.add_argument("--no-spamassassin", action="store_true", help="skip SpamAssassin")
    ap.add_argument("--jobs", type=int, default=2, help="spamd children (default 2)")
    args = ap.parse_args()
    split = _corpus(args.corpus)
    if split is None:
        print("spam-ham corpus not found (set COFFER_CORPUS)", file=sys.stderr)
        return 2
    out: dict[str, Any] = {"corpus": {
        kind: {c: len(_files(split / kind / c)) for c in ("ham", "spam")}
        for kind in ("train", "test")}}
    with tempfile.TemporaryDirectory(prefix="coffer-bench-spam-") as tmp:
        out["coffer"] = run_coffer(split, Path(tmp))
        print(f"coffer       {out['coffer']}", file=sys.stderr)
        if not args.no_spamassassin:
            Path(tmp).chmod(0o755)  # spamd's children run as nobody and read in here
            sa_dir = Path(tmp) / "sa"
            sa_dir.mkdir()
            out["spamassassin"] = run_spamassassin(split, sa_dir, args.jobs)
            print(f"spamassassin {out['spamassassin']}", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
