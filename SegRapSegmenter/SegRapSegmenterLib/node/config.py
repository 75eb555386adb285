"""The node's settings: defaults, a TOML file (``--config``) and command-line flags, flags winning.

A TOML file holds the same names as the flags (``ae_title``, ``port``, ``destinations`` ...) plus
two tables, ``[delivery]`` (retries and backoff) and ``[selection]`` (the plain / contrast CT rule,
see ``selection``). Unknown names are an error, so a misspelt setting never goes unnoticed.
A destination is ``"AE@HOST:PORT"`` or a table ``{address = "AE@HOST:PORT", tls_cert, tls_key, tls_ca}``
(its own mutual TLS files) or ``{address = ..., tls = true | false}`` (the node's files, or plain TCP,
whatever ``[delivery] tls`` says for the others).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..errors import InputError
from .address import Destination, check_ae_title, parse_destination
from .selection import SelectionRule
from .tls import TlsFiles, tls_files

TASKS = ("oar", "gtv")
CONTOUR_HOLES = ("keyhole", "xor")


@dataclass(frozen=True)
class Delivery:
    """How often and how patiently an RTSTRUCT is sent to a destination that does not take it."""

    attempts: int = 8  # per destination, then the study is marked failed
    first_delay_s: float = 10.0  # doubled after every failed attempt
    max_delay_s: float = 600.0
    timeout_s: float = 30.0  # network timeout of one association
    tls: bool = False  # mutual TLS to the destinations (those without tls of their own) with the node's files

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after ``failed_attempts`` failures (exponential backoff, capped)."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** max(0, failed_attempts - 1))


@dataclass(frozen=True)
class NodeConfig:
    """Everything ``segrap serve`` runs with."""

    spool: Path
    ae_title: str = "SEGRAP"
    host: str = "127.0.0.1"  # this machine only unless --host names the address the scanners reach
    port: int = 11112
    destinations: tuple[Destination, ...] = ()
    allow_ae: tuple[str, ...] = ()  # empty: any calling AE title
    settle_s: float = 30.0
    bundle: str | None = None
    device: str = "auto"
    tasks: tuple[str, ...] = TASKS
    contour_holes: str | None = None
    workers: int | None = None  # None: one per GPU (one on a machine without GPUs)
    threads: int | None = None
    python: str | None = None  # the worker's Python (default: this one)
    delivery: Delivery = field(default_factory=Delivery)
    selection: SelectionRule = field(default_factory=SelectionRule)
    min_free_mb: float = 1024.0  # C-STOREs are refused (0xA700) below this much free space on the spool's disk
    max_instance_mb: float = 64.0  # a larger data set is refused (0xA700); one far larger ends its association
    keep_days: float | None = None  # images and outputs of finished studies are deleted after this (None: kept)
    negotiation_s: float = 10.0  # a connection must complete its association request (and TLS handshake) in this
    idle_s: float = 60.0  # an association that completes no PDU for this long (silent or trickling) is closed
    association_s: float = 3600.0  # no association stays open longer
    max_pdu_kb: float = 256.0  # the largest P-DATA-TF PDU the SCP receives (announced to peers); a longer one ends it
    audit_max_mb: float = 64.0  # audit.jsonl is rotated before it grows past this (0: never, journald/logrotate do)
    audit_keep: int = 10  # rotated audit files kept, the oldest deleted
    tls_cert: Path | None = None  # with tls_key and tls_ca: the SCP accepts only mutual-TLS peers signed by the CA
    tls_key: Path | None = None
    tls_ca: Path | None = None

    @property
    def tls(self) -> TlsFiles | None:
        """The TLS files of the SCP (None: plain TCP)."""
        return tls_files(self.tls_cert, self.tls_key, self.tls_ca)


def _read_toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise InputError(f"--config {path}: cannot be read ({exc.strerror}).") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"--config {path}: not valid TOML ({exc}).") from exc


_RENAMED = {"settle": "settle_s", "destination": "destinations"}


def _table(cls, data: dict, where: str):
    known = {f.name for f in fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in known:
            raise InputError(f"{where}: unknown setting {key!r}; known: {', '.join(sorted(known))}.")
        values[key] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**values)
    except TypeError as exc:
        raise InputError(f"{where}: {exc}.") from exc


def _settings_from_file(path: Path) -> dict:
    data = dict(_read_toml(path))
    out: dict = {}
    for key, value in data.items():
        name = _RENAMED.get(key, key)
        if name == "delivery":
            out["delivery"] = _table(Delivery, value, f"--config {path} [delivery]")
        elif name == "selection":
            out["selection"] = _table(SelectionRule, value, f"--config {path} [selection]")
        elif name in {f.name for f in fields(NodeConfig)}:
            out[name] = value
        else:
            raise InputError(f"--config {path}: unknown setting {key!r}.")
    return out


_DESTINATION_KEYS = ("address", "tls", "tls_cert", "tls_key", "tls_ca")


def _destination(item, node_tls: TlsFiles | None, delivery: Delivery) -> Destination:
    """A destination from ``AE@HOST:PORT`` or its table, with the TLS files used to deliver to it."""
    if isinstance(item, Destination):
        return item if item.tls is not None else replace(item, tls=node_tls if delivery.tls else None)
    if not isinstance(item, dict):
        return replace(parse_destination(item), tls=node_tls if delivery.tls else None)
    where = f"destination {item.get('address', item)!r}"
    unknown = sorted(set(item) - set(_DESTINATION_KEYS))
    if unknown or "address" not in item:
        problem = f"unknown {', '.join(unknown)}" if unknown else "no address"
        raise InputError(f"{where}: a destination table has address (AE@HOST:PORT) and optionally tls, or "
                         f"tls_cert, tls_key and tls_ca; {problem}.")
    dest = parse_destination(item["address"])
    own = tls_files(item.get("tls_cert"), item.get("tls_key"), item.get("tls_ca"), f"{where}: tls_cert/tls_key/tls_ca")
    if own is not None:
        if item.get("tls") is False:
            raise InputError(f"{where}: tls = false with tls_cert, tls_key and tls_ca; give one or the other.")
        return replace(dest, tls=own)
    wanted = item.get("tls", delivery.tls)
    if not isinstance(wanted, bool):
        raise InputError(f"{where}: tls = {wanted!r}; true or false.")
    if wanted and node_tls is None:
        raise InputError(f"{where}: tls = true needs the node's tls_cert, tls_key and tls_ca, or its own.")
    return replace(dest, tls=node_tls if wanted else None)


def _checked(values: dict) -> NodeConfig:
    if not values.get("spool"):
        raise InputError("Give the spool folder: --spool DIR (or spool = \"DIR\" in the --config file).")
    v = dict(values)
    v["spool"] = Path(v["spool"]).expanduser()
    v["ae_title"] = check_ae_title(v.get("ae_title", "SEGRAP"), "--ae-title")
    v["allow_ae"] = tuple(check_ae_title(a, "--allow-ae") for a in v.get("allow_ae", ()) or ())
    tasks = v.get("tasks", TASKS)
    tasks = tuple(t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip())
    if not tasks or any(t not in TASKS for t in tasks):
        raise InputError(f"--tasks must be oar, gtv or oar,gtv; got {','.join(tasks) or 'nothing'}.")
    v["tasks"] = tasks
    if v.get("contour_holes") not in (None, *CONTOUR_HOLES):
        raise InputError(f"--contour-holes must be keyhole or xor, got {v['contour_holes']!r}.")
    try:
        v["port"] = int(v.get("port", 11112))
        v["settle_s"] = float(v.get("settle_s", 30.0))
        v["workers"] = None if v.get("workers") is None else int(v["workers"])
        v["min_free_mb"] = float(v.get("min_free_mb", 1024.0))
        v["max_instance_mb"] = float(v.get("max_instance_mb", 64.0))
    except (TypeError, ValueError) as exc:
        raise InputError(f"port, settle, workers, min_free_mb and max_instance_mb must be numbers ({exc}).") from None
    if v["min_free_mb"] < 0:
        raise InputError(f"--min-free-mb {v['min_free_mb']}: megabytes, 0 or more.")
    tls = tls_files(v.get("tls_cert"), v.get("tls_key"), v.get("tls_ca"))
    v["tls_cert"], v["tls_key"], v["tls_ca"] = (tls.cert, tls.key, tls.ca) if tls else (None, None, None)
    if v.get("delivery") is not None and v["delivery"].tls and tls is None:
        raise InputError("[delivery] tls = true needs tls_cert, tls_key and tls_ca (--tls-cert, --tls-key, --tls-ca).")
    destinations = v.get("destinations", ()) or ()
    v["destinations"] = tuple(_destination(d, tls, v.get("delivery") or Delivery())
                              for d in ([destinations] if isinstance(destinations, (str, dict)) else destinations))
    try:
        v["keep_days"] = None if v.get("keep_days") is None else float(v["keep_days"])
    except (TypeError, ValueError):
        raise InputError(f"--keep-days {v.get('keep_days')!r}: a number of days.") from None
    if v["keep_days"] is not None and v["keep_days"] < 0:
        raise InputError(f"--keep-days {v['keep_days']}: days, 0 or more.")
    for name, low, high in (("negotiation_s", 1, 3600), ("idle_s", 1, 86400), ("association_s", 1, 7 * 86400),
                            ("max_pdu_kb", 16, 65536)):
        try:
            v[name] = float(v.get(name, getattr(NodeConfig, name)))
        except (TypeError, ValueError):
            raise InputError(f"{name} = {v.get(name)!r}: a number from {low} to {high}.") from None
        if not low <= v[name] <= high:
            raise InputError(f"{name} = {v[name]:g}: choose from {low} to {high}.")
    try:
        v["audit_max_mb"], v["audit_keep"] = float(v.get("audit_max_mb", 64.0)), int(v.get("audit_keep", 10))
    except (TypeError, ValueError):
        raise InputError("audit_max_mb and audit_keep must be numbers (megabytes; a count of files).") from None
    if v["audit_max_mb"] < 0 or (0 < v["audit_max_mb"] < 0.01) or v["audit_keep"] < 0:
        raise InputError(f"audit_max_mb = {v['audit_max_mb']:g}, audit_keep = {v['audit_keep']}: megabytes, 0 (no "
                         f"rotation) or 0.01 or more; files, 0 or more.")
    if v["max_instance_mb"] <= 0:
        raise InputError(f"--max-instance-mb {v['max_instance_mb']}: megabytes, more than 0.")
    if not 0 <= v["port"] < 65536:
        raise InputError(f"--port {v['port']}: choose a port from 1 to 65535 (0: any free port).")
    if v["settle_s"] < 0:
        raise InputError(f"--settle {v['settle_s']}: seconds of quiet, 0 or more.")
    if v["workers"] is not None and v["workers"] < 1:
        raise InputError(f"workers = {v['workers']}: at least one.")
    return NodeConfig(**v)


def load_config(config_file: str | Path | None = None, **flags) -> NodeConfig:
    """Defaults, then the TOML file's settings, then every flag that was given (not None)."""
    values: dict = _settings_from_file(Path(config_file)) if config_file else {}
    for key, value in flags.items():
        name = _RENAMED.get(key, key)
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        if name not in {f.name for f in fields(NodeConfig)}:
            raise InputError(f"unknown node setting {key!r}")
        values[name] = value
    return _checked(values)


__all__ = ["CONTOUR_HOLES", "Delivery", "NodeConfig", "load_config"]
