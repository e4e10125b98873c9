"""Stage-1 re-export of the optimizer code's new homes (`ckptctl.optstate`, `ckptctl.formats.legacy.optim_*`)
for callers not yet moved (removed with them)."""
from ckptctl.formats.legacy.optim_codec import DIST_FILE, detect  # noqa: F401
from ckptctl.formats.legacy.optim_sides import TargetSide, form_text  # noqa: F401
from ckptctl.optstate.example import EXAMPLE_ARGS, default_kind, example_state  # noqa: F401
from ckptctl.optstate.params import KINDS  # noqa: F401
from ckptctl.optstate.state import inspect_info, store_attrs  # noqa: F401
from ckptctl.optstate import state as _state


def policy_text(info, src_layout, dst_layout, src_form=None, dst_form=None) -> str:
    return _state.policy_text(info, src_layout, dst_layout, src_form or (info and form_text(info)),
                              dst_form or (info and form_text(info)), indices_rebuilt=dst_form is None)
