"""Train: a form for every hyperparameter, presets, launch (several seeds → one group), live runs panel."""

from __future__ import annotations

import streamlit as st

from dashboard import common as ui
from dashboard import forms, runs_view
from samlab.config import PRESETS, RunConfig, preset

PREFIX = "train"
RECENT_FINISHED = 4  # finished runs kept in the live panel below the active ones

ui.page_setup("Train", "Configure a run, launch it in the background, and watch it live. "
              "Closing the tab does not stop it.")


def _load_preset() -> None:
    name = st.session_state["train.preset"]
    forms.load_config_into_state(preset(name), st.session_state, PREFIX)


if forms.state_key(PREFIX, "optim.method") not in st.session_state:
    forms.load_config_into_state(preset("digits-mlp"), st.session_state, PREFIX)

top = st.columns([2, 1, 3])
top[0].selectbox("Preset", sorted(PRESETS), key="train.preset", index=sorted(PRESETS).index("digits-mlp"),
                 help="fills the form; edit anything afterwards")
top[1].button("Load preset", on_click=_load_preset, width="stretch")
top[2].caption("Only the fields that the chosen dataset, model, method, base optimizer and schedule use "
               "are shown. Several seeds launch several runs as one group.")


def _device_options() -> list[str]:
    from samlab.devices import describe_devices

    found = [d["device"] for d in describe_devices()]
    return ["auto", *[d for d in found if d != "cpu"], "cpu"]


with st.container(border=True):
    values, seeds_text, slots = forms.render_config_form(PREFIX, device_options=_device_options())
    configs, errors = forms.check_values(values, seeds_text)
    for field, message in errors.items():
        ui.field_error(slots.get(field, st), message)
    for field, note in forms.field_notes(values).items():
        if field not in errors and field in slots:
            slots[field].caption(f":material/info: {note}")

    launch_cols = st.columns([1, 4])
    clicked = launch_cols[0].button("Launch", type="primary", key="train.launch", width="stretch")
    if errors:
        launch_cols[1].warning("Fix the field marked above to launch.", icon=ui.ICON_WARNING)
    elif len(configs) > 1:
        launch_cols[1].caption(f"{len(configs)} runs (one per seed) will be launched as one group.")


def _launch(configs: list[RunConfig]) -> None:
    ids = ui.submit_train(configs)
    if ids:
        st.session_state["train.launched"] = ids + list(st.session_state.get("train.launched", []))
        st.success(f"Queued {len(ids)} run{'s' if len(ids) > 1 else ''}: " + ", ".join(f"`{i}`" for i in ids))


if clicked:
    if errors:
        st.error("Not launched: " + next(iter(errors.values())), icon=ui.ICON_WARNING)
    else:
        _launch(configs)

st.subheader("Runs")
# Active runs refresh on their own (only their progress and new points); finished ones are drawn once.
runs_view.runs_panel(ui.list_runs(kind="train", status=list(ui.ACTIVE), limit=50),
                     ui.list_runs(kind="train", status=list(ui.FINAL), limit=RECENT_FINISHED))
