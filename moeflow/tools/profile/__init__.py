"""Expert-cache profiling (`moeflow profile`): how large must the cache be, which policy, what a miss costs.

One concern per module:
- `setting`: the model's geometry, `--budgets` and `--policies`;
- `replay`: a recorded trace through the engine's own cache and policies, no model needed;
- `live`: the real engine token by token over the same trace, to measure what replay predicts;
- `analysis`: what the trace itself shows (hot experts, reuse distance, co-activation);
- `bandwidth`: link speeds for the predicted stall, and this machine's disk, measured;
- `report`: the typed records of a profile and their JSON (`moeflow-profile/1`);
- `plot`: the PNG and the text tables;
- `run`: the whole profile (`run_profile`, `profile_model`).
"""
