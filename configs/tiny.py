"""The μOmni tiny Thinker at the seed chapter's size (20,318,464 parameters).

Every field is overridable on the command line, e.g.
`python -m launch.stage_a --config=configs/tiny.py --config.batch_size=8`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # --- Model: ThinkerConfig (muomni_jax/model/thinker.py) at the original thinker_tiny.json ---
    config.vocab_size = 32000  # Vocabulary; also the embedding and lm_head rows.
    config.n_layers = 4  # Number of transformer blocks.
    config.d_model = 256  # Residual stream width.
    config.n_heads = 4  # Attention heads; head dim is d_model // n_heads.
    config.d_ff = 1024  # Hidden width of each MLP (SwiGLU gate/up or GELU fc1).
    config.dropout = 0.1  # On both residual branches, and attention probabilities too.
    config.rope_theta = 10000.0  # RoPE frequency base.
    config.ctx_len = 512  # Tokens per packed training window (the model's context).
    config.use_gqa = True  # Grouped-query attention (q, k, v), else fused qkv.
    config.kv_groups = 2  # Key/value groups under GQA; divides n_heads.
    config.use_swiglu = True  # SwiGLU MLP; False: GELU MLP with biases.
    config.use_moe = False  # Replace each MLP by a top-k mixture of experts.
    config.num_experts = 8  # Experts per MoE layer (only with use_moe).
    config.num_experts_per_tok = 2  # Experts each token is routed to (only with use_moe).
    config.dtype = 'float32'  # Compute dtype: float32 on CPU, bfloat16 on GPU/TPU; params float32.
    config.matmul_dtype = 'float32'  # 'bfloat16': cast every matmul's operands (float32 sums).
    config.remat = False  # Recompute each block's activations in the backward pass (memory).
    config.scan_layers = False  # Run the blocks as one lax.scan: compile time flat in n_layers.
    config.attention_block = 128  # Causal attention in query blocks of N tokens; 0 or ctx_len: one.
    config.attention_dropout = -1.0  # Dropout on attention probabilities; -1: the same as dropout.
    config.attention_impl = (
        'auto'  # 'auto', 'xla', 'cudnn', 'pallas', 'splash' (attention_kernels).
    )

    # --- Data ---
    # File, directory, glob or hf:NAME/CONFIG/SPLIT: text (one document per line), JSON Lines
    # (.jsonl, .jsonl.gz, .jsonl.zst), Parquet, or a datasets save_to_disk folder.
    config.data_path = 'data/text/corpus.txt'
    config.text_key = 'text'  # Field (JSON) or column (Parquet, Arrow) that holds each document.
    config.tfds_name = ''  # TFDS dataset name; when set it replaces data_path (e.g. 'lm1b').
    config.tfds_split = 'train'  # TFDS split to read documents from.
    config.tfds_text_key = 'text'  # Feature of each TFDS example that holds the text.
    config.tfds_data_dir = ''  # TFDS data_dir (may be gs://...); empty uses the TFDS default.
    # Weighted sources, 'name=SOURCE:WEIGHT[:TEXT_KEY],...' (SOURCE as data_path, or
    # tfds:DATASET/SPLIT/TEXT_KEY); replaces data_path. See muomni_jax/data/mixture.py.
    config.mixture = ''
    config.val_split = (
        0.1  # Fraction of documents held out for validation (by a stable content hash).
    )
    config.tokenizer_path = (
        ''  # Existing SentencePiece model to use; empty trains one into save_dir.
    )
    config.tokenizer_sample_size = (
        2_000_000  # Max sentences sampled to train the tokenizer (bounds memory).
    )
    config.data_shards = (
        0  # Shards that each fill batch_size / data_shards rows; 0: one per process.
    )
    config.cache_dir = (
        ''  # Where the tokenized corpus is kept; '': ~/.cache/muomni_jax/token_cache.
    )

    # --- Optimisation ---
    config.batch_size = 16  # Global batch size in windows of ctx_len tokens.
    config.gradient_accumulation_steps = (
        1  # Micro-batches per optimizer step (inside the jitted step).
    )
    config.num_epochs = 10  # Passes over the training windows.
    config.max_steps = (
        0  # Stop after this many optimizer steps if earlier than num_epochs; 0: no limit.
    )
    config.max_train_seconds = (
        0  # Save and stop before this many seconds of training (per launch); 0: none.
    )
    # Total training time the schedule is fitted to: after a few timed steps the run's length is
    # fixed (and kept in its checkpoints) so the decay ends at this budget; 0: off (max_steps).
    config.schedule_seconds = 0
    config.optimizer = (
        'adamw'  # 'adamw', or 'muon': Muon for the block matrices, AdamW for the rest.
    )
    config.muon_momentum = 0.95  # Muon's Nesterov momentum (optimizer='muon' only).
    config.learning_rate = 3e-4  # Peak learning rate (Muon's updates are scaled to share it).
    config.lr_schedule = 'cosine'  # 'cosine' (warmup, cosine decay) or 'wsd' (warmup-stable-decay).
    config.decay_fraction = 0.2  # WSD: the last fraction of the steps that decays linearly.
    config.warmup_steps = 1000  # Linear warmup from 0 to learning_rate.
    config.min_lr_ratio = 0.1  # Decay floor, a fraction of learning_rate (wsd: the last step's).
    config.weight_decay = 0.1  # AdamW decoupled weight decay (not on norms, biases or embeddings).
    config.adam_b1 = 0.9  # AdamW beta1.
    config.adam_b2 = (
        0.999  # AdamW beta2: the original's (PyTorch's default); 0.95 trained worse here.
    )
    config.max_grad_norm = 1.0  # Global-norm gradient clipping.
    config.max_consecutive_nonfinite = 20  # Stop the run after this many NaN/Inf steps in a row.
    config.seed = 0  # Seeds parameter init, dropout and the data shuffle.
    config.loss_chunk_tokens = (
        1024  # Fuse lm_head and loss over chunks of ~N tokens; 0: plain path.
    )
    config.z_loss_weight = 0.0  # Adds this x logsumexp^2 per token (z-loss; e.g. 1e-4); 0: off.
    config.ema_decay = (
        0.0  # Keep an average of the params, e.g. 0.999 (validated beside them); 0: off.
    )

    # --- Logging, evaluation and checkpoints ---
    config.log_every = 100  # Print and record metrics every N steps.
    config.eval_every = 500  # Validate every N steps (and at the end).
    config.eval_batches = 0  # Validation batches per evaluation; 0: the whole validation split.
    # Prompts separated by '|', continued greedily after each validation line; '' for none.
    config.sample_prompts = 'The cat sat on the|Python is a'
    config.sample_max_new_tokens = 20  # Tokens per sample prompt (fewer where ctx_len ends first).
    config.save_every = 1000  # Save a checkpoint every N steps (and at the end).
    config.max_to_keep = 3  # Checkpoints kept in save_dir; older ones are deleted.
    config.save_dir = 'checkpoints/thinker_tiny'  # Checkpoints, tokenizer, config and training log.
    config.restore_step = 0  # Resume from this saved step; 0: the newest complete checkpoint.
    config.profile_steps = (
        ''  # 'start,end': jax.profiler trace of those steps into save_dir; '': off.
    )
    config.wandb_project = ''  # W&B project that also gets the scalars and samples; '': off.

    # --- Devices ---
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # Data-parallel axis size; -1 fills with the devices left over.
    config.mesh.fsdp = 1  # Axis that shards parameters and optimizer state; -1 fills.
    config.compilation_cache = (
        True  # Keep compiled steps on disk, so a restart skips most compiling.
    )
    config.compilation_cache_dir = (
        ''  # '': $JAX_COMPILATION_CACHE_DIR, else ~/.cache/muomni_jax/...
    )
    config.peak_flops_per_device = (
        0.0  # Device peak FLOP/s for MFU; 0: GPU/TPU table, CPU measured.
    )

    # --- Processes (one per TPU VM worker or GPU node; see README "Many devices and hosts") ---
    config.distributed = ml_collections.ConfigDict()
    config.distributed.coordinator_address = (
        ''  # host:port of process 0; '' detects TPU pods/SLURM.
    )
    config.distributed.num_processes = 0  # Processes in the run, with coordinator_address.
    config.distributed.process_id = -1  # This process's index 0..num_processes-1 (-1: unset).
    config.distributed.timeout_s = 300  # Seconds to wait for every process to join.
    return config
