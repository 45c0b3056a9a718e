"""kinema.sampling: flow-matching schedules, samplers and guidance (all pure functions)."""

from kinema.sampling.guidance import ContextModelFn, cfg, contrast_cfg, count_calls
from kinema.sampling.samplers import (
    SAMPLERS,
    UNIPC_ORDERS,
    Callback,
    ModelFn,
    euler,
    euler_step,
    unipc,
)
from kinema.sampling.schedules import (
    SCHEDULE_SAMPLERS,
    Schedule,
    flow_schedule,
    schedule_from_diffusers_config,
    shift_sigmas,
)

__all__ = [
    "SAMPLERS",
    "SCHEDULE_SAMPLERS",
    "UNIPC_ORDERS",
    "Callback",
    "ContextModelFn",
    "ModelFn",
    "Schedule",
    "cfg",
    "contrast_cfg",
    "count_calls",
    "euler",
    "euler_step",
    "flow_schedule",
    "schedule_from_diffusers_config",
    "shift_sigmas",
    "unipc",
]
