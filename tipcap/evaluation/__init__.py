"""Evaluation: pycocoevalcap metrics (:mod:`.metrics`), CLIP-S (:mod:`.clip_scores`), CHAIR (:mod:`.chair`),
prompt adherence (:mod:`.adherence`), seed-level statistics (:mod:`.stats`) and what ``tipcap evaluate`` runs
(:mod:`.evaluate`)."""
