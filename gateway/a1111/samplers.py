"""AUTOMATIC1111's sampler names (and its separate `scheduler` field) <-> Kiln's samplers."""

from __future__ import annotations

from gateway.errors import bad_request

SAMPLERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "euler": ("Euler", ("k_euler",)),
    "euler_a": ("Euler a", ("k_euler_a", "Euler Ancestral")),
    "dpmpp_2m": ("DPM++ 2M", ("k_dpmpp_2m",)),
    "dpmpp_2m_karras": ("DPM++ 2M Karras", ("k_dpmpp_2m_ka",)),
    "ddim": ("DDIM", ()),
    "lcm": ("LCM", ("k_lcm",)),
    "turbo": ("Turbo", ()),
}
"""Kiln sampler -> (AUTOMATIC1111 label, aliases). The labels are the ones Kiln writes in PNG infotexts."""

KARRAS = {"dpmpp_2m": "dpmpp_2m_karras"}
"""With AUTOMATIC1111's `scheduler: "Karras"`, these samplers become their Karras twins."""

_BY_NAME = {n.lower(): kiln for kiln, (label, aliases) in SAMPLERS.items() for n in (kiln, label, *aliases)}


def label(kiln: str) -> str:
    return SAMPLERS[kiln][0] if kiln in SAMPLERS else kiln


def to_kiln(name: str | None, scheduler: str | None, field: str = "sampler_name") -> str:
    """An AUTOMATIC1111 sampler (+ scheduler) -> a Kiln sampler; "" = the model's default. Whether the model
    offers it is the server's check (its refusal names `sampler_name`)."""
    name = (name or "").strip()
    if not name:  # the model's default sampler; a scheduler is still checked, not silently dropped
        if (scheduler or "").strip().lower() not in ("", "automatic", "default", "karras"):
            raise bad_request("scheduler", f"scheduler={(scheduler or '')[:40]!r} is not one Kiln offers; use "
                                           "'Automatic' (or 'Karras' with 'DPM++ 2M')")
        return ""
    kiln = _BY_NAME.get(name.lower())
    if kiln is None and name.lower().endswith(" karras"):  # "DPM++ 2M Karras" under another spelling
        base = _BY_NAME.get(name.lower().removesuffix(" karras"))
        kiln = KARRAS.get(base or "")
    if kiln is None:
        known = ", ".join(f"{label!r}" for label, _ in SAMPLERS.values())
        raise bad_request(field, f"{field}={name[:40]!r} is not a sampler Kiln has; Kiln has {known}")
    sched = (scheduler or "").strip().lower()
    if sched == "karras" and kiln in KARRAS:
        kiln = KARRAS[kiln]
    elif sched not in ("", "automatic", "default") and not (sched == "karras" and kiln in KARRAS.values()):
        text = (f"scheduler={(scheduler or '')[:40]!r} is not offered with {label(kiln)!r}; use 'Automatic' (or "
                "'Karras' with 'DPM++ 2M')")
        raise bad_request("scheduler", text)
    return kiln
