"""A second process for the multi-process registry tests.

``python registry_worker.py URL SERVICE ID [option=value ...]`` registers ``ID`` (TTL 1 s, heartbeating), prints
``ready``, then answers commands on stdin: ``list`` prints the ids of ``SERVICE`` as JSON, ``quit`` closes the
registry (deregistering) and exits. Killed, it stops heartbeating and its instance expires.
"""

from __future__ import annotations

import asyncio
import json
import sys

from meshkit.discovery import Instance, connect


async def main(url: str, service: str, instance_id: str, options: dict[str, str]) -> None:
    async with connect(url, **options) as registry:
        await registry.register(Instance(service, instance_id, "127.0.0.1", 9000), ttl=1.0)
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line == "list":
                print(json.dumps([i.id for i in await registry.list(service)]), flush=True)
            elif line in ("quit", ""):
                break
    print("closed", flush=True)


if __name__ == "__main__":
    url, service, instance_id, *rest = sys.argv[1:]
    asyncio.run(main(url, service, instance_id, dict(item.split("=", 1) for item in rest)))
