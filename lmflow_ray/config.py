"""The typed recipe: model / data / train / storage / serve / eval, loaded from YAML plus overrides.

Field names are LMFlow's flag names, unique across sections, so ``--block_size 512``,
``block_size=512`` and ``data.block_size=512`` all mean the same thing.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError, field_validator,
                      model_validator)

from lmflow_ray.credentials import Secret, secret
from lmflow_ray.errors import UserError
from lmflow_ray.storage import check_endpoint, is_run_name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _to_secret(value: Any) -> Secret | None:
    if value is None or isinstance(value, Secret):
        return value
    if isinstance(value, str):
        return secret(value)
    raise ValueError("must be a string (quote it in YAML)")  # never echo the value


# A credential: a Secret in Python (it travels through Ray as a reference), never written out: JSON
# and YAML dumps (recipe.yaml, `lmflow-ray recipe`, Serve configs) carry null.
SecretField = Annotated[Any, BeforeValidator(_to_secret), PlainSerializer(lambda _: None, when_used="json")]
SECRET_FIELDS = ("aws_access_key_id", "aws_secret_access_key", "api_key")


def _comma_list(value: Any) -> Any:
    """LMFlow passes lists as ``q_proj,v_proj``; YAML may give a real list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class ModelSection(_Section):
    model_name_or_path: str = Field("default", description="HF folder, hub-style name in the cache, or `default` (embedded SmolLM2-135M-Instruct)")
    trust_remote_code: bool = False
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    use_lora: bool = False
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    lora_target_modules: list[str] | None = None
    use_dora: bool = False
    use_qlora: bool = False
    quant_bit: Literal[4, 8] = 4
    use_flash_attention: bool = False
    rope_pi_ratio: float = Field(1.0, ge=1.0)
    rope_ntk_ratio: float = Field(1.0, ge=1.0)

    @model_validator(mode="before")
    @classmethod
    def _qlora_means_lora(cls, data: Any) -> Any:
        """LMFlow's ``--use_qlora 1`` alone trains LoRA adapters on the quantized base."""
        if isinstance(data, dict) and data.get("use_qlora") in (True, 1, "true", "1") and "use_lora" not in data:
            data = {**data, "use_lora": True}
        return data

    @model_validator(mode="after")
    def _qlora_needs_lora(self) -> "ModelSection":
        if self.use_qlora and not self.use_lora:
            raise ValueError("use_qlora trains LoRA adapters on a quantized base; it needs use_lora (leave use_lora out or set it true)")
        return self

    @property
    def method(self) -> str:
        """How the weights are tuned, as checkpoints record it (LISA is the train section's)."""
        return "qlora" if self.use_qlora else "lora" if self.use_lora else "full"

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        return _comma_list(value)


class DataSection(_Section):
    dataset_path: str | None = Field(None, description="file or folder, local or s3://")
    eval_dataset_path: str | None = Field(None, description="held-out data for `lmflow-ray eval`, and for the eval loss during training when train.eval_steps is set")
    validation_split_percentage: int = Field(0, ge=0, lt=100, description="hold out this % of dataset_path's samples (a fixed hash split) for the eval loss during training")
    max_train_samples: int | None = Field(None, ge=1, description="train on the first N samples of dataset_path only")
    conversation_template: str | None = Field(None, description="a preset name, or `tokenizer`; empty = the tokenizer's own")
    block_size: int = Field(1024, ge=8)
    train_on_prompt: bool = False
    packing: bool = Field(True, description="pack samples into block_size rows; false = LMFlow's pad-to-block")
    preprocessing_batch_size: int = Field(1024, ge=1, description="rows per tokenize/pack batch (the packing window)")
    preprocessing_num_workers: int | None = Field(None, ge=1, description="at most this many shards tokenized at once (Ray tasks); empty = as many as there are CPUs")
    mask_prompt: bool = Field(True, description="preference pairs: train only on where chosen and rejected differ (the replies); false = every assistant token")
    max_prompt_length: int | None = Field(None, ge=1, description="preference pairs: cut the shared prompt to its last N tokens")
    streaming: bool = Field(False, description="keep no token rows: each epoch (and a restart) reads the pipeline again while the workers train; needs a CPU beside the workers, and counts the rows first unless max_steps is set")


class TrainSection(_Section):
    num_workers: int | tuple[int, int] = Field(2, description="workers, or [min, max]: elastic, as many as the cluster has room for (DDP and ZeRO-0)")
    use_gpu: bool | None = Field(None, description="empty = use GPUs when CUDA is present")
    resources_per_worker: dict[str, float] | None = None
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    per_device_train_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed: str | dict[str, Any] | None = Field(None, description="zero0 | zero2 | zero2_offload | zero3 | zero3_offload | zero3_offload_params, a DeepSpeed JSON file (read where the run starts; its content travels to the workers) or the JSON inline; empty = plain DDP")
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="eval loss on the held-out set every N steps and at the end; empty = logging_steps when a validation split is taken, else no eval")
    per_device_eval_batch_size: int | None = Field(None, ge=1, description="rows per eval forward pass; empty = per_device_train_batch_size")
    save_steps: int = Field(500, ge=1)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint (-1 = unlimited)")
    placement_timeout_s: float = Field(600.0, ge=0, description="stop the run when its workers stay unplaced this long (not enough CPUs / GPUs, a lost node); 0 = wait as long as it takes, for an autoscaler")
    max_preemption_failures: int = Field(-1, ge=-1, description="restarts after a node is preempted (drained), counted apart from max_failures; -1 = unlimited, 0 = none (Ray's)")
    use_lisa: bool = False
    lisa_activated_layers: int = Field(1, ge=1)
    lisa_interval_steps: int = Field(20, ge=1)
    objective: Literal["sft", "reward", "dpo"] = Field("sft", description="sft | reward (a score head on paired_conversation data) | dpo (the DPO family on paired_conversation data)")
    beta: float = Field(0.1, gt=0, description="dpo: the KL strength β (simpo: the reward scale)")
    loss_type: Literal["sigmoid", "hinge", "ipo", "simpo"] = Field("sigmoid", description="dpo: sigmoid (DPO; cDPO with label_smoothing), hinge, ipo, simpo (reference-free)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo sigmoid / simpo: ε, the share of pairs assumed mislabelled (cDPO)")
    simpo_gamma: float = Field(0.5, ge=0.0, description="simpo: the target reward margin γ")
    margin_scale: float = Field(1.0, ge=0.0, description="dpo: multiplies a pair's `margin` field in the loss")
    rpo_alpha: float = Field(0.0, ge=0.0, description="dpo: adds α x the chosen reply's per-token NLL (TRL's RPO), so DPO cannot lower the chosen replies' own likelihood")
    precompute_ref_log_probs: bool | None = Field(None, description="dpo: the reference's log-probs computed once before training (always for full fine-tuning); empty = LoRA uses its base with the adapter disabled")
    reference_model_name_or_path: str | None = Field(None, description="dpo: the reference model, scored once before training (implies precompute_ref_log_probs); empty = the model training starts from")

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        """2, [1, 3] or "1,3" / "1-3" (the command line's form)."""
        if isinstance(value, str) and any(sep in value for sep in ",-"):
            value = [part for part in value.replace("-", ",").split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError("a number of workers, or [min, max] for elastic training")
            low, high = (int(v) for v in value)
            if not 1 <= low <= high:
                raise ValueError(f"[min, max] needs 1 <= min <= max; got [{low}, {high}]")
            return (low, high) if low < high else low
        return value

    @field_validator("num_workers")
    @classmethod
    def _at_least_one(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError("at least 1 worker")
        return value

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)


class StorageSection(_Section):
    output_model_path: str = Field("output_models/finetune", description="local folder or s3://bucket/prefix")
    run_name: str | None = Field(None, description="empty = a unique name per run; reuse a name to resume")
    endpoint_url: str | None = Field(None, description="S3 endpoint with its scheme: http://host:port or https://host")
    aws_access_key_id: SecretField = None
    aws_secret_access_key: SecretField = None
    region: str | None = None
    save_total_limit: int | None = Field(None, ge=1)
    save_aggregated_lora: bool = Field(False, description="LoRA: also write the final adapter merged into its base, as <run folder>/merged")

    @field_validator("run_name")
    @classmethod
    def _one_folder(cls, value: str | None) -> str | None:
        if value is not None and not is_run_name(value):
            raise ValueError("must be one folder name: letters, digits, '.', '_' and '-' (up to 128), starting "
                             "with a letter or digit; it names <output_model_path>/<run_name>/")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        return check_endpoint(value) if value else value


class SpeculativeConfig(_Section):
    """Speculative decoding, in vLLM's words (also LMFlow's serve.draft_model / serve.gamma)."""

    method: Literal["ngram", "draft_model"] = Field("ngram", description="ngram = prompt lookup (no draft model); draft_model = a small model with the same tokenizer")
    num_speculative_tokens: int = Field(5, ge=1, le=32, description="tokens proposed per step (LMFlow's gamma)")
    prompt_lookup_max: int = Field(3, ge=1, description="ngram: the longest n-gram looked up")
    prompt_lookup_min: int = Field(1, ge=1, description="ngram: the shortest n-gram looked up")
    model: str | None = Field(None, description="draft_model: the draft (run, checkpoint, folder, local or s3://)")
    lookup_recent_replies: int = Field(0, ge=0, le=1024, description="ngram, transformers engine: also look in this many recent replies (per adapter) where the request itself has no match; they shape only proposals and so speed, which other clients could time")

    @field_validator("method", mode="before")
    @classmethod
    def _method_names(cls, value: Any) -> Any:
        return {"prompt_lookup": "ngram", "draft": "draft_model"}.get(value, value)

    @model_validator(mode="after")
    def _complete(self) -> "SpeculativeConfig":
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config: method draft_model needs model (the draft model)")
        if self.method == "ngram" and self.model:
            raise ValueError("speculative_config: method ngram uses no model; drop model, or set method: draft_model")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("speculative_config: prompt_lookup_min is above prompt_lookup_max")
        return self


class ServeSection(_Section):
    engine: Literal["auto", "vllm", "transformers"] = Field("auto", description="auto = vLLM where it is installed, else transformers")
    served_model_name: str | None = Field(None, description="empty = the run or folder name (`SmolLM2-135M-Instruct` for default)")
    lora_adapters: dict[str, str] | None = Field(None, description="name -> adapter folder or checkpoint URI; served as BASE:name")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = Field("EveryNode", description="where Serve's HTTP proxy listens on host:port: every node (put a load balancer in front), the head only, or nowhere")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    max_ongoing_requests: int = Field(8, ge=1, description="per replica; more at once get 503 + Retry-After")
    num_cpus_per_replica: float = Field(1.0, gt=0)
    api_key: SecretField = Field(None, description="Bearer key clients must send; empty = LMFLOW_RAY_API_KEY, if set")
    max_new_tokens: int = Field(256, ge=1, description="the cap on max_tokens per request (both engines)")
    max_n: int = Field(8, ge=1, description="the cap on n, choices per prompt")
    max_prompts: int = Field(32, ge=1, description="the cap on prompts in one completions request (a list is batched)")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    max_stop_chars: int = Field(256, ge=1, description="the longest stop string accepted")
    cors_allow_origins: list[str] | None = Field(None, description="origins allowed to call the API from a browser; empty = none (CORS off)")
    max_batch_size: int = Field(8, ge=1, description="transformers engine: requests decoded together")
    enable_prefix_caching: bool = Field(True, description="vLLM's name: a prompt that begins like a recent one (the same system prompt, an earlier turn) prefills only the rest; the transformers engine keeps recent prompts' KV per adapter")
    prefix_cache_tokens: int = Field(4096, ge=0, description="transformers engine: the most prompt tokens whose KV the prefix cache keeps (per replica; least recently used dropped first)")
    vllm_engine_kwargs: dict[str, Any] | None = Field(None, description="extra vLLM engine arguments (tensor_parallel_size, max_model_len, ...)")
    speculative_config: SpeculativeConfig | None = Field(None, description="speculative decoding (vLLM's names): method ngram | draft_model, num_speculative_tokens, prompt_lookup_max, model")
    draft_model: str | None = Field(None, description="LMFlow's name: a draft model (run, checkpoint, folder, local or s3://) with the served model's tokenizer; = speculative_config method draft_model")
    quantization: Literal["int8", "bnb-4bit", "bnb-8bit"] | None = Field(None, description="weights of the served model: int8 (CPU, torch's dynamic int8 Linear layers), bnb-4bit / bnb-8bit (bitsandbytes; vLLM: bnb-4bit); empty = the model's dtype")
    gamma: int | None = Field(None, ge=1, le=32, description="LMFlow's name: tokens the draft proposes per step; = speculative_config.num_speculative_tokens")

    @field_validator("cors_allow_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        return _comma_list(value)

    @model_validator(mode="after")
    def _speculation(self) -> "ServeSection":
        """LMFlow's draft_model / gamma and vLLM's speculative_config are one setting."""
        spec = self.speculative_config
        if self.draft_model is None and self.gamma is None:
            return self
        if spec is None:
            if self.draft_model is None:
                raise ValueError("serve.gamma: set serve.draft_model (or serve.speculative_config) as well; gamma is "
                                 "the number of tokens a draft proposes")
            spec = SpeculativeConfig(method="draft_model", model=self.draft_model)
        if self.draft_model is not None:
            if spec.method != "draft_model" or (spec.model not in (None, self.draft_model)):
                raise ValueError(f"serve.draft_model {self.draft_model!r} and serve.speculative_config "
                                 f"(method {spec.method}, model {spec.model!r}) disagree; give one of them")
            spec = spec.model_copy(update={"model": self.draft_model})
        if self.gamma is not None:
            spec = spec.model_copy(update={"num_speculative_tokens": self.gamma})
        object.__setattr__(self, "speculative_config", spec)  # validate_assignment would run this again
        return self


class DraftSection(_Section):
    """`lmflow-ray draft`: a draft model for speculative decoding, cut from the target and tuned on its replies."""

    draft_layers: int = Field(4, ge=1, description="decoder blocks of the target the draft keeps (the first ones), with its embeddings and head")
    draft_prompts: int | None = Field(512, ge=1, description="training prompts the target answers for the draft to learn from; empty = all")
    draft_max_new_tokens: int | None = Field(None, ge=1, description="the longest target reply; empty = serve.max_new_tokens")


class AlignSection(_Section):
    """`lmflow-ray align`: RAFT and iterative DPO, generate -> score -> keep / pair -> train, repeated."""

    algorithm: Literal["raft", "iterative_dpo"] = Field("raft", description="raft (best samples -> SFT) | iterative_dpo (scored pairs -> DPO)")
    num_iterations: int | None = Field(None, ge=1, description="iterations (LMFlow's num_raft_iteration); empty = one per dataset_path_list entry, else 3")
    dataset_path_list: list[str] | None = Field(None, description="iterative_dpo: one prompt dataset per iteration (LMFlow's key); empty = data.dataset_path every time")
    prompts_per_iteration: int | None = Field(None, ge=1, description="prompts each iteration samples, taken in turn through the prompt set (LMFlow's raft_batch_size); empty = all")
    num_output_sequences: int = Field(8, ge=1, description="K, responses sampled per prompt")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature (0 = greedy, which makes every K the same)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    output_min_length: int = Field(1, ge=0, description="new tokens at least, per response")
    output_max_length: int = Field(48, ge=1, description="new tokens at most, per response")
    rollout_engine: Literal["auto", "vllm", "transformers"] = Field("auto", description="the sampling actors' engine: auto = vLLM on a cluster with GPUs where it is installed, else transformers")
    rollout_engine_kwargs: dict[str, Any] | None = Field(None, description="rollout_engine vllm: extra vLLM engine arguments (gpu_memory_utilization, max_model_len, ...)")
    reward_model_name_or_path: str | None = Field(None, description="a reward model: a run, checkpoint or folder (train.objective=reward), local or s3://")
    reward_function: str | None = Field(None, description="instead of a reward model: module:function or path/file.py:function, called as f(prompt, response) or f(prompt, response, reference) -> float")
    collection_strategy: Literal["local", "top"] = Field("local", description="raft: local = the best of K per prompt; top = the global top top_reward_percentage")
    top_reward_percentage: float = Field(0.2, gt=0.0, le=1.0, description="raft, collection_strategy top: the share of all samples kept")
    sampling_paired_method: Literal["max_min", "max_max", "max_random", "random"] = Field("max_random", description="iterative_dpo: how K scored responses become one pair")
    length_penalty: float = Field(0.0, description="subtracted from a reward per response token before keeping / pairing")
    reference_policy: Literal["initial", "previous"] = Field("initial", description="iterative_dpo: DPO's reference, the starting model (RLHFlow) or the previous iteration's")
    do_response_generation: bool = Field(True, description="run the generation stage (false: an earlier run's generations must be there)")
    do_scoring: bool = Field(True, description="run the scoring stage")
    do_dpo_align: bool = Field(True, description="run the training stage (DPO, or RAFT's SFT)")

    @field_validator("dataset_path_list", mode="before")
    @classmethod
    def _split_paths(cls, value: Any) -> Any:
        return _comma_list(value)

    @model_validator(mode="after")
    def _lengths(self) -> "AlignSection":
        if self.output_min_length > self.output_max_length:
            raise ValueError(f"output_min_length ({self.output_min_length}) is above output_max_length ({self.output_max_length})")
        if self.reward_model_name_or_path and self.reward_function:
            raise ValueError("give reward_model_name_or_path or reward_function, not both")
        return self


METRIC_ALIASES = {"accuracy": "acc", "perplexity": "ppl", "neg_log_likelihood": "nll", "loss": "nll"}
# LMFlow's dataset-named answer types: GSM8K is a final number, MedMCQA / MedQA-USMLE list lettered
# options; PubMedQA (yes / no / maybe) keeps its name for its default options.
ANSWER_ALIASES = {"gsm8k": "math", "medmcqa": "multiple_choice", "usmle": "multiple_choice"}


class EvalSection(_Section):
    metric: list[Literal["acc", "ppl", "nll"]] = Field(
        default_factory=lambda: ["acc"], description="acc, ppl, nll, or several: acc,nll (LMFlow's accuracy / ppl / nll)")
    answer_type: Literal["text", "multiple_choice", "binary_choice", "math", "pubmedqa"] = Field(
        "text", description="also LMFlow's gsm8k (= math), medmcqa / usmle (= multiple_choice), pubmedqa (yes / no / maybe)")
    prompt_structure: str = Field("{input}", description="text2text prompts: {input} is replaced by the input (LMFlow's flag)")
    inference_batch_size_per_device: int = Field(8, ge=1)
    eval_num_workers: int = Field(0, ge=0, description="model copies scoring in parallel; 0 = one per GPU, else one per 4 CPUs")
    max_eval_samples: int | None = Field(None, ge=1, description="evaluate only the first N instances")
    eval_output_dir: str | None = Field(None, description="results folder, local or s3://; empty = <output_model_path>/eval/<model>-<dataset>")
    server_url: str | None = Field(None, description="evaluate a running OpenAI-compatible server instead of loading the model")

    @field_validator("answer_type", mode="before")
    @classmethod
    def _answer_alias(cls, value: Any) -> Any:
        return ANSWER_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("metric", mode="before")
    @classmethod
    def _split_metrics(cls, value: Any) -> Any:
        names = _comma_list(value)
        return [METRIC_ALIASES.get(n, n) for n in names] if isinstance(names, list) else names


class Recipe(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    align: AlignSection = Field(default_factory=AlignSection)
    draft: DraftSection = Field(default_factory=DraftSection)

    @model_validator(mode="after")
    def _lisa_is_full(self) -> "Recipe":
        if self.train.use_lisa and self.model.use_lora:
            raise ValueError("train.use_lisa trains sampled decoder blocks in full; it does not combine with "
                             "model.use_lora / use_qlora (pick one)")
        return self

    @property
    def method(self) -> str:
        """full | lora | qlora | lisa, as checkpoints record it."""
        return "lisa" if self.train.use_lisa else self.model.method


SECTIONS: dict[str, type[_Section]] = {name: info.annotation for name, info in Recipe.model_fields.items()}

# Flat name -> section, for LMFlow flags and for flat keys at the top of a YAML file.
FIELD_SECTION: dict[str, str] = {
    field: section for section, cls in SECTIONS.items() for field in cls.model_fields
}

# LMFlow / HF flag spellings that differ from ours.
ALIASES: dict[str, str] = {
    "output_dir": "storage.output_model_path",
    "max_seq_length": "data.block_size",
    "model_max_length": "data.block_size",
}

# LMFlow flags that are ours under another name and meaning turned around (flag -> key, value map).
INVERTED: dict[str, str] = {
    "disable_group_texts": "data.packing",  # LMFlow's group_texts concatenates and cuts: our packing
}
ALIASES["lisa_step_interval"] = "train.lisa_interval_steps"  # the spelling in LMFlow's README
ALIASES["num_raft_iteration"] = "align.num_iterations"  # LMFlow's RAFT flags
ALIASES["raft_batch_size"] = "align.prompts_per_iteration"

# LMFlow's DeepSpeed configs (configs/ and configs/archive/), by file name, as our presets: a script
# passes their path, which exists only inside an LMFlow checkout (a file that is there is read).
LMFLOW_DEEPSPEED: dict[str, str] = {
    "ds_config_zero0_no_offload.json": "zero0",
    "ds_config_zero2.json": "zero2_offload", "ds_config_zero2_no_offload.json": "zero2", "ds_config_zero2_nocpu.json": "zero2",
    "ds_config_zero3.json": "zero3_offload", "ds_config_zero3_no_offload.json": "zero3", "ds_config_zero3_nocpu.json": "zero3",
    "zero3_no_offload.json": "zero3",
}

# LMFlow script / HF TrainingArguments flags that mean nothing on Ray: accepted, each with one line
# saying so and why (printed by the CLI), so an LMFlow command line runs as it is.
IGNORED_FLAGS: dict[str, str] = {
    "do_train": "`lmflow-ray train` always trains",
    "overwrite_output_dir": "a run folder is never overwritten: the run resumes run_name's newest checkpoint "
                            "(pass --fresh to start over)",
    "ddp_timeout": "Ray Train sets up the process group and its timeout",
    "dataloader_num_workers": "Ray Data streams the tokenized rows to every worker",
    "dataloader_pin_memory": "Ray Data streams the tokenized rows to every worker",
    "disable_tqdm": "the driver shows one progress bar (or a line per logging step off a terminal)",
    "log_level": "workers log to Ray's log files; the driver prints one line per logging step",
    "logging_dir": "TensorBoard files go to <run folder>/tensorboard",
    "save_strategy": "checkpoints are saved every save_steps steps and at the end",
    "ignore_data_skip": "a resumed run continues at the exact row it stopped at",
    "push_to_hub": "nothing is uploaded to a model hub; checkpoints go to output_model_path (a folder or s3://)",
    "fp16": "fp16 with loss scaling is not built: training runs in the recipe's precision (bf16 with --bf16, "
            "else fp32)",
}
# --optim: the AdamW family trains with our AdamW (DeepSpeed's CPU Adam when the optimizer is offloaded).
ADAMW_VARIANTS = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_apex_fused", "paged_adamw_32bit",
                  "paged_adamw_8bit", "adamw_8bit", "adamw_bnb_8bit")


def _report_to_note(value: Any) -> str:
    """LMFlow's scripts pass --report_to wandb: the run goes on, saying where the metrics go."""
    import importlib.util

    names = [str(v) for v in (value if isinstance(value, list) else str(value).replace(",", " ").split())]
    where = "metrics go to Ray, TensorBoard (<run folder>/tensorboard), loss.png and summary.md"
    if "wandb" in names:
        why = "wandb is not installed here" if importlib.util.find_spec("wandb") is None else "no wandb logger yet"
        return f"--report_to {' '.join(names)}: {why}; {where}"
    return f"--report_to {' '.join(names)}: {where}"

ALL_KEYS: list[str] = [f"{s}.{f}" for f, s in FIELD_SECTION.items()]


def suggest(key: str) -> str:
    """The closest valid dotted key, as `; did you mean X?` (or nothing)."""
    last = key.split(".")[-1]
    pool = ALL_KEYS + list(FIELD_SECTION) + list(SECTIONS)
    match = difflib.get_close_matches(key, pool, n=1, cutoff=0.6) or difflib.get_close_matches(
        last, list(FIELD_SECTION), n=1, cutoff=0.6
    )
    if not match:
        return ""
    best = match[0]
    if best in FIELD_SECTION:
        best = f"{FIELD_SECTION[best]}.{best}"
    return f"; did you mean {best}?"


def canonical_key(key: str, where: str) -> tuple[str, str]:
    """``block_size`` / ``data.block_size`` / ``--block_size`` -> ("data", "block_size")."""
    key = key.lstrip("-").replace("-", "_") if key.startswith("--") else key
    if key in ALIASES:
        key = ALIASES[key]
    if "." in key:
        section, _, field = key.partition(".")
        if section in SECTIONS and field in SECTIONS[section].model_fields:
            return section, field
    elif key in FIELD_SECTION:
        return FIELD_SECTION[key], key
    raise UserError(f"{where}: {key}: unknown key{suggest(key)}")


def mapping_key(key: str, where: str) -> tuple[str, str, list[str]]:
    """Like canonical_key, and ``serve.speculative_config.method`` / ``speculative_config.method``
    -> ("serve", "speculative_config", ["method"]) for keys inside a mapping-valued field."""
    try:
        return (*canonical_key(key, where), [])
    except UserError:
        parts = key.lstrip("-").split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                section, name = canonical_key(".".join(parts[:cut]), where)
            except UserError:
                continue
            annotation = str(SECTIONS[section].model_fields[name].annotation)
            if "dict" in annotation or "Config" in annotation:
                return section, name, parts[cut:]
        raise


def _yaml_lines(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line of that key in the YAML text (best effort)."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")

    walk(root, "")
    return lines


def _parse_value(text: str) -> Any:
    """Override values are YAML scalars: 512 -> int, true -> bool, [a, b] -> list."""
    try:
        return yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        return text


def parse_overrides(args: list[str]) -> list[tuple[str, Any, str]]:
    """``key=value``, ``--key value`` and ``--key=value`` -> [(key, value, as-written)]."""
    out: list[tuple[str, Any, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            if "=" in arg:
                key, _, raw = arg.partition("=")
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, raw = arg, args[i + 1]
                i += 1
                # HF's argument parser takes a list as words: --lora_target_modules q_proj v_proj
                more = []
                while i + 1 < len(args) and not args[i + 1].startswith("--") and "=" not in args[i + 1]:
                    more.append(args[i + 1])
                    i += 1
                if more:
                    words = [raw, *more]
                    out.append((key, [_parse_value(w) for w in words], f"{key} {' '.join(words)}"))
                    i += 1
                    continue
            else:
                key, raw = arg, "true"  # a bare flag, like --use_lora
            out.append((key, _parse_value(raw), arg if "=" in arg else f"{key} {raw}"))
        elif "=" in arg:
            key, _, raw = arg.partition("=")
            out.append((key, _parse_value(raw), arg))
        else:
            raise UserError(f"{arg}: expected key=value or --key value")
        i += 1
    return out


def _nest(flat: dict[str, Any], where: str, lines: dict[str, int]) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in flat.items():
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise UserError(f"{_at(where, lines, key)}: {key}: expected a mapping of keys, got {type(value).__name__}")
            for field, v in value.items():
                section, name = canonical_key(f"{key}.{field}", _at(where, lines, f"{key}.{field}"))
                nested[section][name] = v
        else:
            section, name = canonical_key(str(key), _at(where, lines, str(key)))
            nested[section][name] = value
    return nested


def _at(where: str, lines: dict[str, int], key: str) -> str:
    return f"{where}:{lines[key]}" if key in lines else where


def _note(notices: list[str] | None, line: str) -> None:
    if notices is not None and line not in notices:
        notices.append(line)


def _truthy(value: Any, written: str) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise UserError(f"override '{written}': expected true/false or 1/0")


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None,
                inline: dict[str, Any] | None = None, notices: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or none: all defaults), lay ``inline`` sections over it (a Serve config's
    args), and apply overrides; errors name file, line, key. LMFlow flags that mean nothing here are
    skipped, with one line each in ``notices``."""
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    where = "recipe"
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{where}: recipe file not found")
        text = p.read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise UserError(f"{where}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{where}: a recipe is a mapping of sections (model, data, train, ...)")
        data = loaded
        lines = _yaml_lines(text)
    for key, value in (inline or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value

    nested = _nest(data, where, lines)
    origin: dict[tuple[str, str], str] = {
        (s, f): _at(where, lines, f"{s}.{f}") if f"{s}.{f}" in lines else _at(where, lines, f)
        for s, fields in nested.items()
        for f in fields
    }
    for key, value, written in parse_overrides(overrides or []):
        if any(word in key.lower() for word in ("key", "secret", "token", "password")):
            written = f"{key}=***"  # an error names the override, never a credential's value
        flag = key.lstrip("-").replace("-", "_")
        if flag in IGNORED_FLAGS:
            _note(notices, f"--{flag} is ignored: {IGNORED_FLAGS[flag]}")
            continue
        if flag == "report_to":
            _note(notices, _report_to_note(value))
            continue
        if flag == "optim":
            if value not in ADAMW_VARIANTS:
                raise UserError(f"override '{written}': optim: only the AdamW family is supported ({', '.join(ADAMW_VARIANTS)})")
            _note(notices, f"--optim {value}: trained with AdamW (torch's, or DeepSpeed's CPU Adam when offloaded); "
                           "paged and 8-bit optimizer states are not built")
            continue
        if flag == "deepspeed" and isinstance(value, str) and not os.path.exists(value) \
                and (preset := LMFLOW_DEEPSPEED.get(os.path.basename(value))):
            _note(notices, f"--deepspeed {value}: not here; LMFlow's {os.path.basename(value)} is the {preset} preset")
            value = preset
        if flag in INVERTED:
            key, value = INVERTED[flag], not _truthy(value, written)
        section, name, path = mapping_key(key, f"override '{written}'")
        if path:  # serve.speculative_config.method=ngram: one entry of a mapping
            holder = nested[section].get(name)
            holder = dict(holder) if isinstance(holder, dict) else {}
            nested[section][name], inner = holder, holder
            for part in path[:-1]:
                inner[part] = dict(inner[part]) if isinstance(inner.get(part), dict) else {}
                inner = inner[part]
            inner[path[-1]] = value
        else:
            nested[section][name] = value
        origin[(section, name)] = f"override '{written}'"

    try:
        return Recipe(**nested)
    except ValidationError as err:
        raise UserError(_explain(err, origin, where)) from None


def _explain(err: ValidationError, origin: dict[tuple[str, str], str], where: str) -> str:
    out = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc)
        place = origin.get((loc[0], loc[1]), where) if len(loc) >= 2 else where
        got = e.get("input")
        shown = f" (got {got!r})" if not isinstance(got, dict) and not set(loc) & set(SECRET_FIELDS) else ""
        msg = e["msg"].removeprefix("Value error, ")
        out.append(f"{place}: {key + ': ' if key else ''}{msg}{shown}")
    return "\n".join(out)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The recipe as YAML, credentials left out (null), with a note saying which were set."""
    text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    held = [f"{section}.{name}" for section in ("storage", "serve") for name in SECRET_FIELDS
            if getattr(getattr(recipe, section), name, None) is not None]
    if held:
        text = f"# left out (credentials are never written): {', '.join(held)}\n" + text
    return text
