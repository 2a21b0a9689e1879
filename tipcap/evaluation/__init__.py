"""Evaluation: pycocoevalcap metrics (:mod:`.metrics`), CLIP-S (:mod:`.clip_scores`), CHAIR (:mod:`.chair`),
prompt adherence (:mod:`.adherence`), seed-level statistics (:mod:`.stats`), the retrieval and template
baselines (:mod:`.baselines`), the worlds plugged in (:mod:`.registry`) and what ``tipcap evaluate`` runs
(:mod:`.evaluate`)."""
