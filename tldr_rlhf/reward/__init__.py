"""The reward: everything a summary's score comes from.

* ``reward_model.py``: the scalar-head reward model (``ScalarRewardModel``: a backbone and a linear head
  read at the response's EOS), Auto-class loadable. Saved checkpoints carry a copy of this file under
  this name (their ``auto_map`` names ``reward_model.ScalarRewardModel``), so it keeps its name and
  imports only torch and transformers;
* ``loading.py``: build a reward model from an SFT checkpoint, load one (frozen, or to continue
  training), save one;
* ``scoring.py``: its no-grad scoring: ``pair_rewards`` of a batch of preference pairs (a whole dataset
  with ``tldr_rlhf.scoring.score_preference_pairs``), ``score_responses`` of (query, response) items;
* ``specs.py``: the ``--reward`` spec (a reward-model path, a built-in text reward, a Python
  ``module:function``, a weighted sum) and the RL stages' reward callable.

This package knows nothing about the training loops (``train/``), the stages and their configs beyond
the fields a reward spec is read from, or what a score is used for (RL, evaluation, best-of-n).
"""
