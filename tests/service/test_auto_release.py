"""Auto-release snapshot sets: tied to the requester's control connection, gone when it
closes, when `shadowblk run`'s command ends, and at the next start of the service."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from shadowblk.tools.client import ControlClient

SHADOWBLK = Path(sys.executable).with_name("shadowblk")


def names(service: Any) -> list[str]:
    return [s["name"] for s in service.cli.json("list")]


def wait_for(predicate: Any, service: Any) -> None:
    deadline = time.monotonic() + 30  # a bound on the wait, not a figure checked
    while not predicate():
        assert time.monotonic() < deadline, service.log()
        time.sleep(0.05)


def test_run_holds_the_set_while_the_command_runs(service: Any, short_tmp: Path) -> None:
    cli = service.cli
    cli.run("volume", "create", "v", "--size", "1M", "--sparse")
    cli.run("volume", "create", "my-db.2", "--size", "1M", "--sparse")
    seen = short_tmp / "seen.json"
    script = (
        f'echo "$SHADOWBLK_SNAPSHOTS|$SHADOWBLK_SNAPSHOT_V|$SHADOWBLK_SNAPSHOT_MY_DB_2"; '
        f'"{SHADOWBLK}" --state-dir "$SHADOWBLK_STATE_DIR" list --json > {seen}'
    )
    out = cli.run("run", "v", "my-db.2", "--label", "backup", "--", "sh", "-c", script).stdout
    assert out.strip() == "v@1 my-db.2@1|v@1|my-db.2@1"
    during = json.loads(seen.read_text())
    assert sorted(s["name"] for s in during) == ["my-db.2@1", "v@1"]
    assert {s["label"] for s in during} == {"backup"}
    assert names(service) == []  # released when the command ended
    assert cli.run("run", "v", "--", "sh", "-c", "exit 7", expect=7)
    assert names(service) == []
    missing = cli.run("run", "v", "--", "/nonexistent/command", expect=127)
    assert "cannot run" in missing.stderr
    assert "--" in cli.run("run", "v", expect=2).stderr
    assert cli.run("create", "v").returncode == 0  # a persistent one stays
    assert names(service) == ["v@4"]


def test_closing_the_connection_releases_the_set(service: Any) -> None:
    service.cli.run("volume", "create", "v", "--size", "1M", "--sparse")
    with ControlClient.connect(service.state_dir) as client:
        made = client.call("snapshot.create", volumes=["v"], auto_release=True)
        assert made["snapshots"][0]["attrs"] == {"auto_release": True}
        assert names(service) == ["v@1"]
    wait_for(lambda: names(service) == [], service)


def test_a_restart_releases_what_a_dead_service_held(service: Any, service_factory: Any) -> None:
    service.cli.run("volume", "create", "v", "--size", "1M", "--sparse")
    client = ControlClient.connect(service.state_dir)
    client.call("snapshot.create", volumes=["v"], auto_release=True)
    service.cli.run("create", "v")
    service.kill()  # the connection dies with it: nobody could release the set
    client.close()
    again = service_factory(service.state_dir)
    assert names(again) == ["v@2"]
    assert "deleting auto-release snapshot v@1" in again.log()
