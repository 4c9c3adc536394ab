"""A P2P check that moves data, run once when a GPU Communicator starts (issue 6, item 2).

The driver can report peer access (``can_device_access_peer``) on machines where stores through
the peer mapping never land or loads return another GPU's memory (IOMMU / ACS settings,
virtualized GPUs, broken NVLink). Custom all-reduce kernels then hang or return garbage, so
before the fast path is used every rank moves a pattern through the mapping and every rank
checks it (kernels in :mod:`tpcomm.kernels.p2p_probe`)::

    snapshot my probe area         (nothing of a peer's lands here before the first round)
    round "id":      host, GPU UUID and a random nonce part from every rank
    cached failure for this machine?  -> veto without probing (post it in the next round)
    write kernel: pattern(me, q, i, nonce) into slot ``me`` of every rank q's area; sync
    round "written": every rank's stores completed (or its veto / kernel error)
    read kernel: count wrong words per source rank (own area) and per peer (remote loads); sync
    round "counts":  every rank's counts, so every rank reaches the same verdict
    restore my probe area from the snapshot (bytes exactly as set-up left them: the push
    kernels rely on the 0xFF sentinel fill)

Verdict cache: one small JSON file per machine and GPU set under TPCOMM_CACHE_DIR, keyed by
hostname, the group's GPU UUIDs, the driver and the torch / CUDA versions. Only a failure of the
data comparison is cached (not a peer that died, not a compiler error) and a cached failure
vetoes at once, with the file's path in the message. A cached success does not skip the probe:
the probe costs milliseconds (two small kernels, three store rounds) once Triton's disk cache
holds the kernels, and the cache must never enable a path the live check would veto (a driver
reloaded with other settings keeps its version). So the cache can only veto.
TPCOMM_P2P_CHECK=0 skips both the probe and the cache (set it alike on every rank: the check
is collective).

Bounded: the store rounds wait at most ``timeout_s`` (GroupStore), and the host waits for each
probe kernel by polling an event for at most ``timeout_s`` (a store through a broken mapping
must not hang the process); no kernel here waits for a peer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import random
import socket
import tempfile
import time

import torch

from ..settings import get_settings

log = logging.getLogger("tpcomm")

# Bytes of the probe area per rank: 64 KiB is 16 pages, 16384 int32 words, shared by the world's
# slots (2048 words each on 8 GPUs); the kernels move it in microseconds.
PROBE_BYTES = 64 << 10
CACHE_PREFIX = "p2p-check-"
SILENCE = "TPCOMM_P2P_CHECK=0 skips this check"


@dataclasses.dataclass(frozen=True)
class P2PVerdict:
    """What the last check in this process decided (``tpcomm check`` and the tests read it)."""
    ok: bool
    source: str               # "probe" (ran now), "cache" (a cached failure) or "skipped"
    reason: str | None = None
    cache_path: str | None = None
    seconds: float = 0.0


_last: P2PVerdict | None = None


def last_verdict() -> P2PVerdict | None:
    """The verdict of the last :func:`verify_p2p` in this process (None if none ran)."""
    return _last


# ---------------------------------------------------------------- the verdict cache
def driver_version() -> str:
    """The NVIDIA kernel module's version (from /proc), else the CUDA runtime torch uses."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline()
        words = first.split()
        for i, w in enumerate(words):
            if w == "Module" and i + 1 < len(words):
                return words[i + 1]
        return first.strip()[:80]
    except OSError:
        return f"unknown (cuda {torch.version.cuda}, hip {getattr(torch.version, 'hip', None)})"


def device_id(device: torch.device) -> str:
    """A GPU's UUID where torch reports it, else its name and PCI address."""
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    if uuid is not None and str(uuid):
        return str(uuid)
    pci = [getattr(props, a, None) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
    if None not in pci:
        return f"{props.name}@{pci[0]:04x}:{pci[1]:02x}:{pci[2]:02x}"
    return f"{props.name}#{device.index}"


def cache_key(host: str, gpu_ids: list[str], driver: str) -> dict:
    return {"host": host, "gpus": sorted(gpu_ids), "driver": driver,
            "torch": torch.__version__, "cuda": str(torch.version.cuda)}


def cache_path(cache_dir: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{CACHE_PREFIX}{digest}.json")


def read_cached(path: str, key: dict) -> dict | None:
    """The cached entry for ``key`` ({"ok", "reason", "checked_at"}), or None. A missing, broken
    or foreign file is ignored (debug log)."""
    try:
        with open(path) as f:
            entry = json.load(f)
        if not isinstance(entry, dict) or entry.get("key") != key or \
                not isinstance(entry.get("ok"), bool):
            raise ValueError("not an entry for this machine")
        return entry
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        log.debug("tpcomm: ignoring the P2P verdict cache %s: %s", path, e)
        return None


def write_cached(path: str, key: dict, ok: bool, reason: str | None) -> None:
    """Write the entry atomically (temp file + rename); failures are logged at debug level."""
    entry = {"key": key, "ok": ok, "reason": reason,
             "checked_at": datetime.datetime.now().isoformat(timespec="seconds")}
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".p2p-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        log.debug("tpcomm: could not write the P2P verdict cache %s: %s", path, e)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def cached_verdicts(cache_dir: str, host: str | None = None) -> list[tuple[str, dict]]:
    """(path, entry) of every readable cached verdict (of ``host`` if given), for reports."""
    out = []
    try:
        names = sorted(os.listdir(cache_dir))
    except OSError:
        return out
    for name in names:
        if name.startswith(CACHE_PREFIX) and name.endswith(".json"):
            path = os.path.join(cache_dir, name)
            try:
                with open(path) as f:
                    entry = json.load(f)
                if host is None or entry["key"]["host"] == host:
                    out.append((path, entry))
            except (OSError, ValueError, TypeError, KeyError) as e:
                log.debug("tpcomm: ignoring %s: %s", path, e)
    return out


# ---------------------------------------------------------------- the probe
def _sync(device: torch.device, timeout_s: float | None = None) -> None:
    """Wait for the work queued on ``device``; with ``timeout_s``, poll an event and raise
    TimeoutError past it (a store through a broken mapping must not hang the host)."""
    if device.type != "cuda":
        return
    if timeout_s is None:
        torch.cuda.synchronize(device)
        return
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    deadline = time.monotonic() + timeout_s
    while not done.query():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the kernel did not finish within {timeout_s:g} s")
        time.sleep(0.0002)


def mismatch_reason(rows: list[list[int]], slot_words: int) -> str | None:
    """The verdict from every rank's counts (rank -> [received from 0..R-1, loaded from 0..R-1]),
    the same text on every rank; None when every word matched."""
    world = len(rows)
    # stores before loads, a rank's own slot last: the first line names the broken pair best
    bad = []
    for reader, row in enumerate(rows):
        for src in range(world):
            if row[src]:
                bad.append((src == reader, 0, f"rank {reader} read {row[src]} wrong words (of "
                            f"{slot_words}) written by rank {src} through the peer mapping"))
        for src in range(world):
            if row[world + src]:
                bad.append((src == reader, 1, f"rank {reader} loaded {row[world + src]} wrong "
                            f"words (of {slot_words}) from rank {src}'s buffer through its "
                            f"mapping"))
    bad = [b[2] for b in sorted(bad, key=lambda b: b[:2])]
    if not bad:
        return None
    more = f" (and {len(bad) - 1} more mismatching pairs)" if len(bad) > 1 else ""
    return bad[0] + more


def probe(buf, probe_off: int, probe_nbytes: int, store, nonce: int,
          veto: str | None = None, timeout_s: float = 60.0) -> tuple[str | None, str]:
    """The collective data check over ``buf``'s probe area (see the module docstring).

    ``store`` has ``all_gather(name, value) -> list[bytes]`` over the group; the caller took
    the snapshot round (the probe area must not change before every rank has entered). ``veto``
    (a cached failure) skips the kernels on every rank. Returns (reason or None, kind): kind is
    "mismatch" (the data comparison: worth caching), "cache" (some rank's cached veto) or
    "error" (a kernel failed). Restoring the area is the caller's job."""
    from ..kernels import p2p_probe as k
    rank, world = buf.rank, buf.world_size
    words = k.slot_words(probe_nbytes, world)
    if words <= 0 or probe_off % 16:
        raise ValueError(f"P2P probe area of {probe_nbytes} bytes at offset {probe_off} is too "
                         f"small or not 16-byte aligned for {world} ranks")
    addrs = tuple(p + probe_off for p in buf.buffer_ptrs)
    mine = f"cache\n{veto}" if veto else ""
    if not veto:
        try:
            k.p2p_probe_write(addrs, words, rank, nonce)
            _sync(buf.device, timeout_s)
        except Exception as e:  # noqa: BLE001 - every rank must reach the round below
            mine = (f"error\nrank {rank}: the probe's store kernel failed "
                    f"({type(e).__name__}: {e})")
    for v in store.all_gather("written", mine):
        if v:
            kind, why = v.decode().split("\n", 1)
            return why, kind
    try:
        counts = torch.zeros(2 * world, dtype=torch.int32, device=buf.device)
        k.p2p_probe_read(addrs, words, rank, nonce, counts)
        _sync(buf.device, timeout_s)
        mine = json.dumps([int(c) for c in counts.cpu()])
    except Exception as e:  # noqa: BLE001
        mine = f"rank {rank}: the probe's load kernel failed ({type(e).__name__}: {e})"
    posted = [v.decode() for v in store.all_gather("counts", mine)]
    for why in posted:
        if not why.startswith("["):
            return why, "error"
    return mismatch_reason([json.loads(v) for v in posted], words), "mismatch"


def verify_p2p(buf, probe_off: int, info, device: torch.device, timeout_s: float, *,
               probe_nbytes: int = PROBE_BYTES, store=None) -> str | None:
    """Check that every pair of ranks moves data through ``buf``'s peer mappings.

    Collective over ``info``'s group, right after the symmetric buffer is set up and before any
    kernel uses it; ``[probe_off, probe_off + probe_nbytes)`` of every rank's data region is
    borrowed and restored byte for byte. Returns None when the fast path may be used, else the
    reason (the same on every rank), ready to raise as a TpcommError. ``store``: anything with
    ``all_gather`` (default: a GroupStore on ``info``'s group with ``timeout_s``)."""
    global _last
    t0 = time.perf_counter()
    settings = get_settings()
    if not settings.p2p_check:
        _last = P2PVerdict(ok=True, source="skipped", reason="TPCOMM_P2P_CHECK=0")
        return None
    if store is None:
        from ..groups.group import GroupStore
        store = GroupStore(info, "p2p_check", timeout_s)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        reason, verdict = _verify(buf, probe_off, probe_nbytes, device, timeout_s, store,
                                  settings.cache_dir, t0)
    _last = verdict
    return reason


def _verify(buf, probe_off, probe_nbytes, device, timeout_s, store, cache_dir, t0):
    area = buf.local_data()[probe_off:probe_off + probe_nbytes]
    snapshot = area.clone()
    _sync(device)
    ident = {"host": socket.gethostname(), "gpu": device_id(device) if device.type == "cuda"
             else f"cpu:{buf.rank}", "nonce": random.getrandbits(31)}
    rows = [json.loads(v) for v in store.all_gather("id", json.dumps(ident))]
    nonce = 0
    for r in rows:
        nonce ^= int(r["nonce"])
    key = cache_key(rows[0]["host"], [r["gpu"] for r in rows], driver_version())
    path = cache_path(cache_dir, key)
    cached = read_cached(path, key)
    veto = None
    if cached is not None and not cached["ok"]:
        veto = (f"the P2P check failed on this machine before ({cached.get('reason')}; cached "
                f"{cached.get('checked_at')} in {path}: delete it to check again, {SILENCE})")
    try:
        reason, kind = probe(buf, probe_off, probe_nbytes, store, nonce, veto, timeout_s)
    finally:
        area.copy_(snapshot)
        try:
            _sync(device, timeout_s)
            restored = True
        except TimeoutError:   # queued behind a probe kernel that never finished
            restored = False
    if not restored and reason is None:
        reason, kind = f"rank {buf.rank}: restoring the probe area did not finish", "error"
    if kind == "cache":
        return reason, P2PVerdict(False, "cache", reason, path, time.perf_counter() - t0)
    raw = reason
    if reason and kind == "mismatch":
        reason = (f"the P2P check moved data and {reason}: peer access is reported but does "
                  f"not work ({SILENCE}; verdict cached in {path})")
    elif reason:
        reason = f"the P2P check could not run: {reason} ({SILENCE})"
    if buf.rank == 0 and kind == "mismatch" and (cached is None or cached["ok"] != (not reason)):
        write_cached(path, key, raw is None, raw)
    return reason, P2PVerdict(reason is None, "probe", reason, path, time.perf_counter() - t0)
