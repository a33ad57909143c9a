"""SQLite across processes: consumers SIGKILLed 20 times while 20,000 messages flow; nothing may be lost."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = 20_000
KILLS = 20
DEADLINE = 300.0


def spawn(stderr: Path, *args: str) -> subprocess.Popen[bytes]:
    with stderr.open("ab") as err:  # a file, not a pipe: a pipe nobody reads can fill up and block the child
        return subprocess.Popen([sys.executable, "-m", "tests.messaging.crash_worker", *args], cwd=ROOT, stderr=err)


def errors(folder: Path) -> str:
    return "\n".join(f"{p.name}: {p.read_text()[-2000:]}" for p in sorted(folder.glob("*.err")) if p.read_text())


def handled(logs: list[Path]) -> Counter[int]:
    seen: Counter[int] = Counter()
    for log in logs:
        if log.exists():
            seen.update(int(line) for line in log.read_text().split() if line.strip())
    return seen


def test_killed_consumers_lose_nothing(tmp_path: Path) -> None:
    db = tmp_path / "broker.db"
    rng = random.Random(7)
    logs: list[Path] = []
    consumers: list[subprocess.Popen[bytes]] = []

    def start_consumer() -> subprocess.Popen[bytes]:
        log = tmp_path / f"effects-{len(logs)}.log"
        logs.append(log)
        return spawn(tmp_path / f"consumer-{len(logs)}.err", "consume", "--db", str(db), "--log", str(log))

    # the producer creates the file; consumers join once it is there
    producer = spawn(tmp_path / "producer.err", "produce", "--db", str(db), "--count", str(MESSAGES))
    wait_until(db.exists, "the producer to create the database", DEADLINE)
    consumers = [start_consumer() for _ in range(3)]
    try:
        kills = 0
        step = MESSAGES // (KILLS + 2)
        while kills < KILLS:
            # kill on progress, not on a timer: every `step` newly handled messages
            target = (kills + 1) * step

            def reached(target: int = target) -> bool:
                assert all(c.poll() is None for c in consumers), f"a consumer died on its own: {errors(tmp_path)}"
                return len(handled(logs)) >= target

            wait_until(reached, f"{target} handled before kill {kills + 1}", DEADLINE)
            victim = rng.randrange(len(consumers))
            consumers[victim].send_signal(signal.SIGKILL)
            consumers[victim].wait()
            consumers[victim] = start_consumer()
            kills += 1
        assert producer.wait(timeout=DEADLINE) == 0, errors(tmp_path)
        wait_until(lambda: len(handled(logs)) >= MESSAGES, f"all {MESSAGES} handled", DEADLINE)
    finally:
        for process in [producer, *consumers]:
            if process.poll() is None:
                process.kill()
            process.wait()

    seen = handled(logs)
    lost = set(range(MESSAGES)) - set(seen)
    duplicates = sum(count - 1 for count in seen.values())
    print(f"\nsqlite crash test: {MESSAGES} messages, {KILLS} SIGKILLs, lost={len(lost)}, duplicates={duplicates}")
    assert not lost, f"lost {len(lost)} messages, e.g. {sorted(lost)[:10]}"
    assert set(seen) == set(range(MESSAGES))
