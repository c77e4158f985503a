"""A per-GPU memory plan of a training run: `fewstep plan`.

For a method preset, an engine (DDP or FSDP) and a world size it estimates, in bytes per GPU:

* weights: every network a run holds (methods/*.py, fewstep/engine/adapt.py): each trained network
  (generator, critic, DMD2's GAN head) keeps fp32 trainable parameters (master_weights_fp32; the
  bf16 autocast computes from them, so they are also the "fp32 masters"); a LoRA network keeps
  its base weights in the teacher's dtype (bf16) and its adapters in fp32. The frozen teacher
  denoiser and text encoders are bf16 (a teacher link's default dtype), the VAE fp32 (the
  backbones load it so), and trainable_copy deep-copies the backbone's VAE into the generator and
  the critic (the text stack is shared). Reward models and the LPIPS VGG trunk are fp32.
* gradients: fp32, one per trainable parameter; both networks' gradients can be alive at once
  (zero_grad sets a network's to None only at its next update). DDP at N > 1 adds the flat fp32
  all-reduce buffer of the largest network (fewstep.engine.distributed.average_gradients).
* optimiser: AdamW's exp_avg and exp_avg_sq in fp32 per trainable parameter, plus its fp32 step
  scalar per parameter tensor. No separate master copy: the trained parameters are fp32.
* EMA: a deep copy of the generator's denoiser (base and adapters, dtypes kept; loop.Trainer).
* cast: bf16 autocast's cached casts of the trainable fp32 parameters, 2 bytes each (CUDA, DDP).
  FSDP's mixed-precision policy casts per block instead: "cast" is then the gathered bf16 block
  being computed and the one prefetched plus its fp32 gradient before the reduce-scatter:
  4 + 4 bytes per parameter of the largest block.
* activations: tensors saved for backward by one forward with gradient, per sample, traced on the
  meta device (no weights, no compute) with flash attention standing in for attention (it saves
  q, k, v, out and an fp32 log-sum-exp, never the N x N scores), in bf16 (the CUDA autocast
  dtype; fp32 on CPU). With activation checkpointing per block (ResnetBlock2D and
  BasicTransformerBlock in a UNet, the units diffusers checkpoints; the joint/SiT blocks of a
  transformer; also the FSDP units of the "cast" column):
      act_ckpt = outside + sum(block inputs) + max(block inside),
      act_full = outside + sum(block inside),
  where `inside` is what a block saves and `outside` what the layers between blocks save.
  Per update, activations = sum over its forwards with gradient of samples x per-sample bytes
  (method_forwards); the run's peak is its heaviest update. No-grad forwards (teacher, critic's DM
  prediction, rollouts) keep no activations; their transient workspace is not counted.
* FSDP (torch.distributed.fsdp.fully_shard): weights, gradients, optimiser states and EMA of the
  trained networks are divided by the world size; the frozen teacher denoiser is replicated
  (fsdp_teacher = replicate, the default) or sharded (/N, fsdp_teacher = shard), in bf16; text encoders, VAE, reward and LPIPS stay replicated.
Batch per GPU: global_batch / N where the preset gives global_batch, else its (per-rank) batch.
Not counted: the CUDA context and allocator fragmentation (leave a few GiB), the VAE decoder and
reward model activations of DMD's LPIPS regression, DMD2's warm start and RTDMD stage 2's reward
back-propagation (named in the legend per preset), and data-loader memory.

The modules: census (parameter counts and bytes), architectures (the real configurations on
the meta device), networks (the networks a run holds, its forwards with gradient), trace and
activations (tensors saved for backward), table (the rows per engine) and presets (the plan of
each paper preset). Every public name is importable from here.
"""
from __future__ import annotations

# the public names of the modules, re-exported: callers import them from fewstep.engine.memory
from fewstep.engine.memory.census import (BF16, FP32, GIB, Census, census, held_bytes,
                                          trained_census)
from fewstep.engine.memory.architectures import (CLIP_BIGG, CLIP_L, DINOV2_L, HPS_CLIP_H, LATENT,
                                                 SD3_TRANSFORMER, SDXL_UNET, T5_XXL, TEXT_TOKENS,
                                                 VAE_KL, VAES, extra_params, frozen_extras,
                                                 real_denoiser, real_head)
from fewstep.engine.memory.networks import (Network, critic_lora, frozen_extra_names,
                                            frozen_networks, gan_on, generator_lora, has_critic,
                                            is_regression_stage, method_forwards, trained_networks,
                                            with_targets)
from fewstep.engine.memory.trace import (CHECKPOINT_BLOCKS, SavedTrace, flash_attention_stand_in,
                                         trace_forward)
from fewstep.engine.memory.activations import (activations, denoiser_call, feature_module,
                                               real_trace, trace_denoiser)
from fewstep.engine.memory.table import (ENGINES, TEACHER_PLACEMENT, Row, Static, engine_row,
                                         largest_block, static_of)
from fewstep.engine.memory.presets import (FAMILY_OF_PRESET, family_of, forwards_text, method_of,
                                           not_computed, paper_presets, plan_preset, preset_divides,
                                           preset_options, real_extras)
