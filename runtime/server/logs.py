"""The access log: one line per Generate call (and per refused call of any other method) on the `kiln.access`
logger, its fields in the record's `kiln` attribute, which `--log-format json` writes as JSON keys. Never a
secret: the key's id only."""

from __future__ import annotations

import logging
from dataclasses import asdict

from runtime.server.interceptors.observe import CallRecord

log = logging.getLogger("kiln.access")


def access_log(call: CallRecord) -> None:
    """An `ObserveInterceptor` sink."""
    if call.method != "Generate" and not call.reason:
        return
    fields = {k: v for k, v in asdict(call).items() if v not in ("", 0, 0.0, {})}
    fields["status"], fields["seconds"] = call.status, round(call.seconds, 4)
    fields["stages"] = {k: round(v, 4) for k, v in call.stages.items()}
    text = (f"{call.method} {call.status}" + (f" ({call.reason})" if call.reason and call.reason != call.status else "")
            + (f" model={call.model}" if call.model else "") + (f" mode={call.mode}" if call.version else "")
            + (f" size={call.width}x{call.height} steps={call.steps} sampler={call.sampler} images={call.images}"
               if call.version else "")
            + f" {call.seconds:.3f}s request={call.request_id}" + (f" key={call.key_id}" if call.key_id else ""))
    log.info(text, extra={"kiln": fields})
