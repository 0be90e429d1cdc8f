"""Builds docs/results/ties/ties_s65.json from stop 65's runs under results/s65/ (see plan_s65.md); run from the repository root."""
import json
R = "results/s65/"
L = lambda p: json.load(open(p))
def high(path):
    out = {}
    for r in L(path)["rows"]:
        if r.get("r") in (96, 112, 128) and "setting" in r:
            key = f"{r['setting']} r={r['r']}"
            out[key] = ({"difference": r["difference"], "ci95": r["ci95"]} if "difference" in r else r["accuracy"])
    return out
def moved(path):
    return [{k: r[k] for k in ("method", "compression_ratio", "max_abs_nll_difference", "examples_moved_over_1e-4",
             "examples", "ratio_to_uncompressed")} for r in L(path)["settings"]]
dev = {f: L(R + f"dev_{f}.json")["ratio_to_uncompressed"] for f in ("old", "lowest", "own")}
summary = {
    "what": "stop 65: one tie order for every selection (top-k, ranks, ToMe-style's edge ranking, the greedy "
            "removal, eviction, KV seeds: lowest index first, a stable sort), held tokens of the greedy matching "
            "removed by their own scores past the mutual rule, a window the budget cannot keep whole cut by its own "
            "attention; how far each measured setting moved, old code (9493a7a, a worktree) against the new",
    "plan": "docs/results/ties/plan_s65.md",
    "machine": "2 CPU cores, torch 2.14.1",
    "vision_reference_vit_2000_test_images": {
        "command": "python benchmarks/exploration/tie_check_vision.py OUT.pt (PYTHONPATH of each checkout); "
                   "python benchmarks/exploration/compare_logits.py BEFORE.pt AFTER.pt",
        "rows": L(R + "vision_cmp2.json")["rows"]},
    "logits_check_50_settings": {k: v for k, v in L(R + "logits_cmp.json").items() if k != "rows"},
    "greedy_past_the_cap_test_set": {
        "command": "python benchmarks/exploration/vision_high_compression.py --split test --r 96 112 128 --only greedy",
        "before (docs/results/issue11/vision_high_test.json)": high("docs/results/issue11/vision_high_test.json"),
        "after": high(R + "vision_high_test.json")},
    "greedy_past_the_cap_heldout_4488": {
        "command": "python benchmarks/exploration/vision_high_compression.py --r 96 112 128 --only greedy",
        "before (docs/results/issue11/vision_high_heldout.json)": high("docs/results/issue11/vision_high_heldout.json"),
        "after": high(R + "vision_high_heldout.json")},
    "hidden_scaled_greedy_entropy_test_set": {
        "command": "python -m quickmerge eval vision --matching greedy --methods quickmerge --schedules entropy "
                   "--similarity hidden --saliency-rule scaled --r-values 96 112 128 --timing-rounds 1",
        "accuracy_before_after": L(R + "vision_hs_greedy_cmp.json")["settings"]},
    "greedy_assignment_time": L(R + "greedy_assign_check.json"),
    "text_slice": {"command": "python -m quickmerge eval text --model smollm2-135m --examples 3 --context 512 "
                              "--continuation 32 --ratios 0.5 --methods quickmerge quickmerge-replay quickmerge-input "
                              "kvpress-snapkv quickmerge-replay-pooled quickmerge-replay-leverage-spans --threads 2 "
                              "--fresh (old code from a worktree, and this code)",
                   "moved": moved(R + "text_final_cmp.json")},
    "video40_rerun": {"command": "torchrun --standalone --nproc_per_node 2 -m quickmerge eval video --examples 40 "
                                 "--ratios 0.25 0.5 0.75 --threads 1 --methods (every QuickMerge++ press, ToMe-KV)",
                      "moved_against_video40_s64": moved(R + "video40_final_moved.json")},
    "window_dev_48_windows": {"command": "python benchmarks/exploration/ar_variants.py video --first 40 --count 48 "
                                         "--ratios 0.25 0.5 0.75 --methods quickmerge-frame quickmerge-input "
                                         "(old 9493a7a, lowest-first 835df4c, own scores 98fcd9f)",
                              "ratio_to_uncompressed": dev},
    "gpu_check_cpu_references": {"video_cpu_s65_vs_s64": moved(R + "video_cpu_final_vs_s64.json"),
                                 "image_cpu_s65_vs_s64": moved(R + "image_cpu_final_vs_s64.json")},
}
summary["image40_rerun"] = {"command": "torchrun --standalone --nproc_per_node 2 -m quickmerge eval image --examples 40 "
                                       "--ratios 0.25 0.5 0.75 --threads 1 --methods (every QuickMerge++ press, ToMe-KV)",
                            **{f"moved_against_{f}": [m for m in moved(R + f"{f}_final_moved.json") if m["method"] != "none"]
                               for f in ("image", "image_replay_row", "image_columns")}}
json.dump(summary, open("docs/results/ties/ties_s65.json", "w"), indent=1)
print("ok")
def per_trial(path):
    return [r["correct_per_trial"] for r in L(path)["summary"] if r["compression_ratio"] == 0.75][0]
summary["passkey_075_recommended_retrieval"] = {
    "command": "torchrun --standalone --nproc_per_node 2 -m quickmerge eval passkey --model gemma3-270m --trials 100 "
               "[--first 100] --needle once --answered-only --ratios 0.75 --methods quickmerge-replay-leverage-spans "
               "--threads 1 (stop 29's runs a and b at 0.75)",
    **{f"run {x}": {"trials": len(per_trial(R + f"passkey_spans_{x}.json")),
                    "correct_before": sum(per_trial(f"docs/results/issue10/passkey_gemma_once_spans_{x}.json")),
                    "correct_after": sum(per_trial(R + f"passkey_spans_{x}.json")),
                    "trials_differing": sum(p != q for p, q in zip(per_trial(R + f"passkey_spans_{x}.json"),
                                            per_trial(f"docs/results/issue10/passkey_gemma_once_spans_{x}.json")))}
       for x in ("a", "b")}}
json.dump(summary, open("docs/results/ties/ties_s65.json", "w"), indent=1)
print(summary["passkey_075_recommended_retrieval"])
summary["independent_clips"] = {
    "command": "torchrun --standalone --nproc_per_node 2 -m quickmerge eval video --video CLIP --examples N --ratios 0.5 "
               "0.75 --threads 1 --methods quickmerge-replay-proportional quickmerge-frame quickmerge-input "
               "quickmerge-input-time (stop 33's commands, our presses only)",
    **{c: [m for m in moved(R + f"video_{c}_moved.json") if m["method"] != "none"] for c in ("tree", "box", "cup")}}
json.dump(summary, open("docs/results/ties/ties_s65.json", "w"), indent=1)
print("clips added")
