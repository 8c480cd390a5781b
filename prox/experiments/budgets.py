"""Experiment ``budgets``: compute-budget curricula, NoProp, private training and unlearning on the one loop.

  prox --config=prox/experiments/configs/budgets.py --workdir=runs/budgets

Expected effects, fixed before any run and reported either way (paired comparisons over seeds,
``report.paired_comparison``; "within 2 points" means a mean paired difference of at most 0.02 in
absolute value, and the table also says whether the 95% interval lies inside +-0.02):

1. ``budget``: the decaying budget beats the fixed tight budget at the final budget (test accuracy of the
   prediction after ``B_min`` refinement steps; on each dataset).
2. ``noprop``: NoProp is within 2 points of backprop on digits (test accuracy; backprop trains an MLP of
   about NoProp's parameter count with the same optimizer, steps and batches).
3. ``privacy``: fine-tuning the DP model on the retained data reaches retraining's forgotten-set accuracy
   (within 2 points) at a fraction of its cost (optimizer steps and training time).

Parts (``config.parts``):

* ``budget`` (Hammoud et al. 2025, "Train Long, Think Short: Curriculum Learning for Efficient
  Reasoning"; Tian et al. 2025, "Reinforcement Mid-Training"), on digits and MNIST-1D: a weight-tied
  iterative classifier (``prox.models.IterativeClassifier``, ``K`` refinement steps, the prediction after
  ``n`` steps is the budget-``n`` answer) trained for the same number of steps by four arms:
  ``fixed``: cross-entropy of the prediction at the final budget ``B_min`` throughout; ``decay``: the same
  loss at the budget ``B(s)`` of ``prox.tasks.budget_schedule`` (generous ``B_0`` to ``B_min`` over the
  first ``decay_fraction`` of the steps, then ``B_min``), whose state lives in ``TrainState.extra``, is
  read by the loss through ``ctx.extra`` and steps in the compiled step (a transition); ``entropy``: at
  ``B_min``, examples drawn by ``prox.tasks.entropy_curriculum`` (``p_i ~ exp(-beta h_i)``, ``h_i`` each
  example's latest normalised predictive entropy, written by the step's transition from its own batch;
  ``beta`` annealed from ``beta_start`` (easy first) to ``beta_end`` over ``decay_fraction``); ``grpo``:
  GRPO (Shao et al. 2024) with the halting step as the length: per input ``G`` samples of a halting step
  ``l`` (``prox.losses.halting_log_probs`` of a halting head over ``1..K``) and a class ``c ~ softmax(z_l)``,
  reward ``r = 1[c = y] + w 1[l <= B(s)] 1[c = y]`` (``prox.losses.budget_reward``, shape "within",
  gated) under the decaying budget, group-relative advantages and the clipped surrogate
  (``prox.losses.grpo_loss``; one update per batch, so the ratio is 1 and no KL term). Every arm is
  evaluated by the test accuracy of its prediction after ``B_min`` steps (and after each ``n = 1..K``).
* ``interval`` (Hu et al. 2025, "Towards Better Alignment: Training Diffusion Models with Reinforcement
  Learning Against Sparse Rewards", B^2-DiffuRL): a DDPM chain (Ho et al. 2020) of ``T`` steps on 2-D
  points (8 Gaussians on a circle; an MLP predicts the noise), pretrained on the mixture, then fine-tuned
  by policy gradient (each denoising step a Gaussian policy; DDPO-style, Black et al. 2024) against a
  sparse terminal reward, ``r = 1`` if the final point lies within ``reward_radius`` of one of the 4
  even-numbered modes, with advantages normalised over the batch (one group). ``backward``: only the
  steps of the interval ``[t_s, T]`` (``prox.tasks.backward_interval``, from the last step alone to the
  whole chain over ``grow_fraction`` of the updates) carry the loss (``prox.losses.interval_step_loss``);
  ``all``: every step from the start. Reported: the final reward, its curve, and the diversity (the
  normalised entropy of the rewarded samples over the 4 rewarded modes).
* ``staged`` (Lee, Cho and Yoo 2023, "Instruction Tuning with Human Curriculum"), on digits: item
  difficulties from an artificial crowd's answers and a 1PL IRT fit (as PUDF, Meng, Lalor et al. 2024,
  ``prox.tasks.irt``), binned into ``num_levels`` equal-count levels (``prox.tasks.difficulty_levels``), the
  class as the group; an MLP trained for ``epochs`` epochs whose order is ``prox.tasks.staged_sampler``'s
  ``blocked`` (class by class, easy to hard within a class), ``interleaved`` (easy to hard, classes taking
  turns) or ``mixed`` (uniformly random order), or ``random``: the interleaved order with the levels
  randomly permuted (the same staging with tags that carry no difficulty).
* ``noprop`` (Li, Teh and Pascanu 2025, "NoProp: Training Neural Networks without Back-propagation or
  Forward-propagation", NoProp-DT), on digits and MNIST-1D: ``prox.models.NoPropDT``, one block per step
  (``t ~ U{0..T-1}`` drawn in the loss), against backprop training of an MLP with ``baseline_depth``
  hidden layers whose width makes its parameter count the closest to NoProp's. Memory: the temporary
  memory of each compiled training step (XLA's ``memory_analysis().temp_size_in_bytes``); the benchmark
  ``benchmarks/noprop_memory.py`` compares the same blocks trained end to end.
* ``privacy`` (Al Mahmud, Jebreel, Domingo-Ferrer and Sanchez 2025, "DP2Unlearning"), on digits: an MLP
  trained with DP-SGD (Abadi et al. 2016) in ``prox.step``: ghost clipping
  (``prox.optim.ghost_clipped_loss``) and ``prox.optim.dp_noise`` on Poisson-sampled batches (each
  example joins a step's batch with probability ``q = batch_size / N``; the buffer is padded with weight-0
  rows and the gradient normalised by the expected batch size); ``epsilon`` from the accountant
  (``prox.tasks.dp_epsilon``, RDP and PLD) for the run's ``sigma``, ``q``, steps and ``delta``. A random
  ``forget_fraction`` of the train split is then forgotten: ``finetune_dp``: the DP model fine-tuned
  without noise on the retained data only (``prox.tasks.unlearning``'s sampler and loss weights) for
  ``finetune_steps``; ``retrain``: a fresh model trained on the retained data for ``retrain_steps``;
  and, to show what the DP base buys, ``plain`` (the same training without clipping and noise) and
  ``finetune_plain`` (``plain`` fine-tuned like ``finetune_dp``). Each is scored on the forgotten,
  retained and test data, by the loss-threshold membership AUC of the forgotten set against the test
  set (``prox.tasks.membership_auc``; 0.5: no leak) and by its cost (steps, training time).

Every run is one ``prox.loop.run`` in its own directory under ``workdir/<part>/`` (``config.json``,
``result.json``; models that later runs start from keep a checkpoint), so a run that finished is reused
when the command is run again (``common.run_once``). Outputs: ``results.md`` (tables, the paired
comparisons with the expected effects), ``results.json`` and PNG plots.
"""
