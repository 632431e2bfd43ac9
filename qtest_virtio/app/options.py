"""The options the pytest plugin and ``qtest-virtio`` share: transport modes, device flags and
driver-side refusals, parsed and checked the same way for ``--virtio-*`` and ``run --*``.

No pytest and no QEMU here, so it is unit-tested directly.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable

from .. import modes
from ..errors import UsageError
from ..machine import split_option_list


class OptionError(UsageError, ValueError):
    """A malformed option or marker; the message names it and the fix (the CLI exits 128)."""


def parse_transports(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """``legacy,modern`` (or ``all``) -> modes in design.md's order; rejects unknown names."""
    if text is None or text == "" or text == "all":
        return modes.ALL_MODES
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if "all" in names:
        return modes.ALL_MODES
    bad = [n for n in names if n not in modes.ALL_MODES]
    if bad:
        raise OptionError(f"unknown transport mode {', '.join(bad)}; valid: {', '.join(modes.ALL_MODES)} or all")
    return tuple(m for m in modes.ALL_MODES if m in names)


#: Device properties the harness sets itself, which a flag for every device must not override:
#: why each is the harness's. The transport mode chooses disable-legacy/-modern (design.md).
HARNESS_PROPERTIES = {
    "id": "the harness names every device it starts, and finds its driver by that id",
    "bus": "the harness places every device on the machine's PCI bus",
    "addr": "the harness places every device on the machine's PCI bus",
    "drive": "the harness makes the block backend (a scratch disk image) and wires it",
    "netdev": "the harness makes the network backend (a socket pair) and wires it",
    "chardev": "the harness makes the character backend (a socket pair) and wires it",
    "disable-legacy": "the transport mode chooses it (modern: disable-legacy=on); select modes with {transport}",
    "disable-modern": "the transport mode chooses it (legacy: disable-modern=on); select modes with {transport}",
}


def parse_flags(
    text: str | None, option: str = "--virtio-flags", transport_option: str = "--virtio-transport"
) -> dict[str, str]:
    """``event_idx=off,packed=on`` -> {'event_idx': 'off', 'packed': 'on'}. Commas split items
    as QEMU's ``-device`` does: ``serial=a,,b`` is the value ``a,b``. A property the harness
    owns (:data:`HARNESS_PROPERTIES`) is refused; ``option`` names the option in messages."""
    out: dict[str, str] = {}
    for item in split_option_list(text or ""):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise OptionError(f"{option} item {item!r} is not PROPERTY=VALUE (e.g. event_idx=off)")
        if key in HARNESS_PROPERTIES:
            reason = HARNESS_PROPERTIES[key].format(transport=transport_option)
            raise OptionError(f"{option}: {key}={value} cannot be set: {reason}")
        out[key] = value
    return out


def parse_refuse(text: str | None) -> frozenset[str]:
    """``EVENT_IDX,INDIRECT_DESC`` -> the feature names, upper-cased."""
    return frozenset(t.strip().upper() for t in (text or "").split(",") if t.strip())


#: ``q35`` and ``pc`` (each binary's newest), or a versioned type as a migration across
#: versions needs on both sides (``pc-q35-7.2``, ``pc-i440fx-10.0``).
_MACHINE_RE = re.compile(r"^(q35|pc|pc-q35-\d+\.\d+|pc-i440fx-\d+\.\d+)$")


def machine_type(text: str) -> str:
    """An argparse ``type=`` for ``--machine`` / ``--qemu-machine``."""
    if not _MACHINE_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose q35, pc, or a versioned pc-q35-X.Y / pc-i440fx-X.Y)"
        )
    return text
