"""Pure logic of the plugin: option parsing and the parametrisation of virtio_device tests.

No pytest and no QEMU here, so it is unit-tested directly; plugin.py adapts it to pytest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qtest_virtio import modes
from qtest_virtio.machine import split_option_list

RINGS = ("split", "packed")
#: Modes whose register layout can negotiate RING_PACKED (bit 34 needs the 64-bit features).
PACKED_MODES = frozenset(m for m, legacy in modes.USES_LEGACY_LAYOUT.items() if not legacy)


class OptionError(ValueError):
    """A malformed plugin option or marker; the message names it and the fix."""


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


@dataclass(frozen=True)
class VirtioParam:
    """One parametrisation of a virtio_device test: the device, its mode and flags."""

    device: str
    mode: str
    ring: str
    #: Device properties: the option's and the marker's, plus packed=on for the packed ring.
    flags: tuple[tuple[str, str], ...] = ()
    refuse: frozenset[str] = frozenset()
    #: Flags that vary between runs (option-given and the ring), shown in the test id.
    id_flags: tuple[tuple[str, str], ...] = ()
    #: Why this combination cannot run, decided before QEMU starts ("" when it can).
    skip: str = ""
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False)
    #: Refusals that come from the option (those of the marker are the same in every run).
    id_refuse: frozenset[str] = frozenset()
    #: A run added by --virtio-refuse-each (one feature refused on its own).
    refuse_each: bool = False

    @property
    def id(self) -> str:
        parts = [self.device, self.mode] + [f"{k}={v}" for k, v in self.id_flags]
        if self.id_refuse:
            parts.append("refuse=" + "+".join(sorted(self.id_refuse)))
        return "-".join(parts)

    @property
    def flag_dict(self) -> dict[str, str]:
        return dict(self.flags)


def virtio_params(
    device: str,
    *,
    selected_modes: tuple[str, ...],
    option_flags: Mapping[str, str],
    option_refuse: frozenset[str],
    marker_kwargs: Mapping[str, Any],
    refuse_each: tuple[str, ...] = (),
) -> list[VirtioParam]:
    """Every (mode, ring) a test runs on: the selected modes that the marker allows, split and
    packed rings (packed only where the layout can negotiate it, unless flags force one)."""
    kwargs = dict(marker_kwargs)
    allowed = parse_transports(kwargs.pop("transports", None))
    rings = tuple(kwargs.pop("rings", RINGS))
    bad_rings = [r for r in rings if r not in RINGS]
    if bad_rings:
        raise OptionError(f"virtio_device(rings=...): unknown ring {bad_rings}; valid: split, packed")
    marker_flags = {k: str(v) for k, v in dict(kwargs.pop("flags", {})).items()}
    marker_refuse = frozenset(kwargs.pop("refuse", ()))
    refuse = option_refuse | marker_refuse
    forced_packed = option_flags.get("packed")
    params: list[VirtioParam] = []
    for mode in selected_modes:
        if mode not in allowed:
            continue
        for ring in rings:
            flags = {**marker_flags, **option_flags}
            id_flags = dict(option_flags)
            skip = ""
            if forced_packed is not None:
                # The option decides the ring: one run per mode, named by the flag.
                if ring != rings[0]:
                    continue
                ring = "packed" if forced_packed == "on" else "split"
                if ring == "packed" and mode not in PACKED_MODES:
                    skip = f"packed=on needs the modern register layout; mode {mode} drives the legacy one"
                elif ring not in rings:
                    skip = f"this scenario is for {'/'.join(rings)} rings only; packed={forced_packed} forces {ring}"
            elif ring == "packed":
                if mode not in PACKED_MODES:
                    continue
                flags["packed"] = "on"
                id_flags["packed"] = "on"
            params.append(
                VirtioParam(
                    device=device,
                    mode=mode,
                    ring=ring,
                    flags=tuple(flags.items()),
                    refuse=refuse,
                    id_flags=tuple(id_flags.items()),
                    skip=skip,
                    extra=tuple(kwargs.items()),
                    id_refuse=option_refuse,
                )
            )
    # Each feature refused on its own (issue 4): one extra run per feature, on the layout that
    # can negotiate them all (modern, split), unless the marker keeps the test off it.
    if refuse_each and modes.MODERN in selected_modes and modes.MODERN in allowed and "split" in rings:
        base = {**marker_flags, **option_flags}
        for feature in refuse_each:
            if feature in refuse:
                continue
            params.append(
                VirtioParam(
                    device=device,
                    mode=modes.MODERN,
                    ring="split",
                    flags=tuple(base.items()),
                    refuse=refuse | {feature},
                    id_flags=tuple(option_flags.items()),
                    extra=tuple(kwargs.items()),
                    id_refuse=option_refuse | {feature},
                    refuse_each=True,
                )
            )
    return params
