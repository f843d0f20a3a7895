"""Evaluation: does IMG beat its base model, by learned preference scorers, on public prompt sets?

    from img.eval.prompts import load_prompt_set      # HPDv2, Parti, T2I-CompBench, Pick-a-Pic, plain text
    from img.eval.sampling import sample_prompts      # the DuckDB sample, stratified by category
    from img.eval.scorers import resolve_scorers, load_scorer   # PickScore, HPSv2 (v2.0 / v2.1), tiny
    from img.eval.winrates import compute_win_rates  # win rates with 95% Wilson intervals
    from img.eval import report                       # the notebooks' queries and figures

The job that ties them together is ``pipelines/eval.py`` (``img jobs eval``).
"""
