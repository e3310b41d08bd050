"""One run per output directory: a lock file, `.lock`, that a training run creates when it starts writing there.

The lock holds JSON naming its run: host, pid, the process's start time, the command and when it started. It
is created with O_CREAT | O_EXCL, so of two runs starting together exactly one gets it, and removed when the
run exits. A lock whose run is gone (killed with -9, a crashed host that came back) blocks nobody: on the same
host, a pid that is not alive, or alive but started at another time (the pid was reused), makes it stale, and
the next run replaces it and says so. A lock of another host cannot be checked from here, so it is respected.

    claim_directory(path, log=print)       # the claim, or OutputDirectoryBusy naming the other run
    release_claims()                        # every claim of this process (also done at exit)

The launchers guard their log folder the same way, for their own shell process:

    python run_lock.py claim FOLDER --pid $$ --lock_name .launcher.lock --command "..."   # exit 1: in use
"""
import argparse
import atexit
import json
import os
import shlex
import socket
import sys
import time

LOCK_NAME = ".lock"
UNREADABLE_GRACE_S = 10  # a lock still empty after this long was left by a claim killed halfway


class OutputDirectoryBusy(Exception):
    """Another live run holds the directory's lock."""


def boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _stat_fields(pid):
    """/proc/<pid>/stat's fields after '(name)' (which may hold spaces), from field 3 of proc(5) on; None where
    it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_time(pid):
    """When process `pid` started, as '{boot id}:{clock ticks since boot}' (None where /proc is missing)."""
    fields = _stat_fields(pid)
    return None if fields is None else f"{boot_id()}:{fields[19]}"  # field 22 of proc(5)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, but alive
    fields = _stat_fields(pid)
    return not fields or fields[0] != "Z"  # a zombie has finished; unreadable: alive, as kill(0) said


def describe(owner):
    return (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started', '?')}: "
            f"{owner.get('command', '?')}")


def staleness(owner):
    """Why the lock of `owner` (its JSON) is stale, or None while its run may be alive."""
    if owner.get("host") != socket.gethostname():
        return None  # another host's processes cannot be checked from here
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not pid_alive(pid):
        return f"pid {pid} is not running"
    started = process_start_time(pid)
    if owner.get("start_time") and started and started != owner["start_time"]:
        return f"pid {pid} now belongs to another process"
    return None


def read_lock(lock_path):
    """(text, owner) of the lock file: owner None when it is not JSON (yet); FileNotFoundError when gone."""
    with open(lock_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        owner = json.loads(text)
    except ValueError:
        return text, None
    return text, owner if isinstance(owner, dict) else None


def remove_stale(lock_path, seen_text):
    """Move the stale lock aside and delete it, unless it changed since we read it (another run's fresh one,
    which goes back). True when the stale lock is gone."""
    aside = f"{lock_path}.stale.{os.getpid()}"
    try:
        os.rename(lock_path, aside)
    except FileNotFoundError:
        return False  # another run removed it first
    with open(aside, encoding="utf-8", errors="replace") as f:
        if f.read() == seen_text:
            os.remove(aside)
            return True
    try:
        os.link(aside, lock_path)  # put the fresh lock back, unless yet another run holds the name now
    except OSError:
        pass
    os.remove(aside)
    return False


class Claim:
    def __init__(self, lock_path, owner):
        self.lock_path, self.owner = lock_path, owner

    def release(self):
        """Remove the lock, if it is still this claim's."""
        try:
            _, owner = read_lock(self.lock_path)
            if owner is not None and (owner.get("pid"), owner.get("start_time")) == \
                    (self.owner["pid"], self.owner["start_time"]):
                os.remove(self.lock_path)
        except OSError:
            pass
        if self in _claims:
            _claims.remove(self)


_claims = []


def claim_directory(path, lock_name=LOCK_NAME, pid=None, command=None, log=print):
    """Claim the existing folder `path` for process `pid` (default: this one): its Claim, or OutputDirectoryBusy.

    A stale lock is replaced, with a note through `log`. OSError when the folder cannot be written.
    """
    pid = os.getpid() if pid is None else pid
    lock_path = os.path.join(path, lock_name)
    owner = {"host": socket.gethostname(), "pid": pid, "start_time": process_start_time(pid),
             "command": (command or shlex.join([os.path.basename(sys.executable)] + sys.argv))[:500],
             "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(5):  # each round either claims, refuses, or removes a stale lock (or loses that race)
        try:
            fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(owner) + "\n")
            claim = Claim(lock_path, owner)
            _claims.append(claim)
            return claim
        try:
            text, other = read_lock(lock_path)
            age = time.time() - os.stat(lock_path).st_mtime
        except FileNotFoundError:
            continue  # released meanwhile: try again
        if other is None:
            if age < UNREADABLE_GRACE_S:
                time.sleep(0.2)  # another run is writing its lock right now
                continue
            why, other = "it is empty or unreadable (a claim interrupted halfway)", {}
        else:
            why = staleness(other)
        if why is None:
            raise OutputDirectoryBusy(
                f"{path} is in use by another run ({describe(other)}). Wait for it to finish or stop it, or use "
                f"another directory; if that run is gone (a run on another host cannot be checked from here), "
                f"delete {lock_path}")
        if remove_stale(lock_path, text):
            log(f"note: replaced the stale lock {lock_path} ({why}; it was {describe(other)})")
    raise OutputDirectoryBusy(f"{path} is being claimed by other runs at this very moment; try again")


@atexit.register
def release_claims():
    """Release every claim this process holds (forked children hold none of their parent's)."""
    for claim in list(_claims):
        if claim.owner["pid"] == os.getpid():
            claim.release()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Claim a folder for a process (a launcher's shell, say); "
                                                 "the process removes the lock file when it ends.")
    parser.add_argument("action", choices=["claim"])
    parser.add_argument("folder")
    parser.add_argument("--pid", type=int, required=True, help="the process the claim is for")
    parser.add_argument("--lock_name", default=LOCK_NAME)
    parser.add_argument("--command", default=None, help="what that process runs, as the lock names it")
    args = parser.parse_args(argv)
    try:
        claim = claim_directory(args.folder, args.lock_name, args.pid, args.command,
                                log=lambda message: print(message, file=sys.stderr))
    except OutputDirectoryBusy as error:
        print(f"[Error] {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"[Error] cannot write a lock file into {args.folder}: {error}", file=sys.stderr)
        return 1
    _claims.remove(claim)  # the lock outlives this helper: its process removes it
    print(claim.lock_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
