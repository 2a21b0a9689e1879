"""The toy worlds of coloured shapes (:mod:`.world1`, :mod:`.world2` with its :mod:`.world2_grammar` and
:mod:`.world2_claims`), a tiny CLIP trained on them (:mod:`.clip`), and their plug-in to evaluation
(:mod:`.plugin`, :mod:`.prompt_sources`): a wing above the library, which finds it through the entry point
``toy`` of the group ``tipcap.worlds`` and never imports it.

Nothing is imported here: ``tipcap toyworld`` needs :mod:`tipcap.toy.world1` without the torch that
:mod:`tipcap.toy.clip` brings.
"""
