"""A tiny, random-weight, deterministic Qwen-Image pipeline for tests and CI.

The real ``Qwen/Qwen-Image`` checkpoint is ~54 GB and cannot be downloaded in CI (there is no network
access to a model hub there at all). The code in this package only cares about *shapes and code paths*,
not about pretty pictures, so the tests run against a miniature built here, from scratch, offline:

* every component is an instance of **the same class** as in the released model
  (``QwenImagePipeline`` with ``FlowMatchEulerDiscreteScheduler``, ``AutoencoderKLQwenImage``,
  ``Qwen2_5_VLForConditionalGeneration``, ``Qwen2Tokenizer``, ``QwenImageTransformer2DModel``), and every
  structural knob of the released configs is kept (VAE channel multipliers and temporal downsampling,
  so the VAE scale factor is 8; patch size 2 and 64 packed latent channels; multimodal RoPE in the text
  encoder; the scheduler's dynamic "exponential" shifting; ...). Only widths and depths shrink, so the
  pipeline runs the same code as with the real weights;
* ``write_tiny_model`` saves it in diffusers format, so ``QwenImagePipeline.from_pretrained(DIR)`` loads
  it like the real thing (``model_index.json`` names the same classes);
* it is deterministic: the same seed gives byte-identical ``*.safetensors`` files, another seed gives
  other weights. The tokenizer is trained without randomness and does not depend on the seed.

The tokenizer deserves a word. ``QwenImagePipeline`` wraps every prompt in a chat template and then
*drops a fixed number of leading hidden states* (``prompt_template_encode_start_idx = 34``), assuming the
template prefix (system message up to ``<|im_start|>user\\n``) is exactly 34 tokens, which is what the
real 151k-token Qwen2 BPE vocabulary gives (every template word is one token). A tokenizer that splits,
say, ``relationships`` into two pieces would make the pipeline drop the wrong hidden states: the last
template token would leak into the prompt embedding and the first prompt token would be lost, and tests
that count prompt tokens or compare embeddings would test a behaviour the real model never has. So the
tiny byte-level BPE is trained on a corpus in which the template is frequent, and the builder *asserts*
the 34-token property. Byte-level BPE also means any text (e.g. Chinese prompts) round-trips exactly,
as with the real tokenizer.

The tiny model also comes in the two image-edit flavours (``task="edit"``: ``QwenImageEditPipeline``, as
``Qwen/Qwen-Image-Edit``; ``task="edit-plus"``: the multi-image ``QwenImageEditPlusPipeline``, as
``Qwen/Qwen-Image-Edit-2509``). They add what editing needs: a ``Qwen2VLProcessor`` (the released image
processor settings around the same tokenizer) that turns the input image into patches for the text
encoder's vision tower (tiny but with the released patch, merge, temporal-patch and window sizes, and
both window- and full-attention blocks). The edit template's system prompt is longer, and its pipelines
drop 64 leading hidden states; the edit flavours' tokenizer is trained on that template too, so its
prefix is 64 tokens as with the real vocabulary (checked the same way). The text-to-image tokenizer
stays as it was, so the text-to-image tiny model's files do not change.

Importing this module is cheap: torch, diffusers, transformers and tokenizers are imported inside the
functions that need them.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from qwen_batch.errors import ConfigError
from qwen_batch.families import GENERATE
from qwen_batch.families.qwen_image import FAMILY as QWEN_IMAGE
from qwen_batch.io.file_modes import apply_umask
from qwen_batch.weights.model_source import TINY_MODEL_SEED

if TYPE_CHECKING:
    import diffusers
    import transformers

__all__ = [
    "EDIT_PROMPT_TEMPLATE_PREFIX",
    "EDIT_PROMPT_TEMPLATE_PREFIX_TOKENS",
    "PROMPT_TEMPLATE_PREFIX",
    "PROMPT_TEMPLATE_PREFIX_TOKENS",
    "TINY_EDIT_MODEL_REVISION",
    "TINY_MODEL_REVISION",
    "TINY_MODEL_SEED",
    "TINY_MODEL_TASKS",
    "build_tiny_pipeline",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "tiny_model_revision",
    "write_tiny_model",
]

# Bump when the builder changes what it writes, so a tiny model cached under $QWEN_BATCH_HOME is rebuilt.
TINY_MODEL_REVISION = 2

# The part of `QwenImagePipeline.prompt_template_encode` before "{}" (the user's prompt), and how many
# tokens the real Qwen2 tokenizer makes of it (= `prompt_template_encode_start_idx`). `build_tiny_pipeline`
# also checks the tokenizer against the template and drop count of the installed diffusers, so a release
# that changes them fails loudly instead of silently dropping the wrong tokens.
PROMPT_TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
PROMPT_TEMPLATE_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
PROMPT_TEMPLATE_PREFIX_TOKENS = 34

# What the tiny model can be built for (the names `write_tiny_model(task=...)` and `qwen-batch tiny-model
# --task` take) and the diffusers pipeline class each is saved as.
TINY_MODEL_TASKS = {task: pipeline for pipeline, task in QWEN_IMAGE.pipelines.items()}
# Bump when what only the edit flavours write changes (processor, edit tokenizer). A change to what all
# flavours share bumps TINY_MODEL_REVISION, which rebuilds them all (see `tiny_model_revision`).
TINY_EDIT_MODEL_REVISION = 1

# The same for the edit pipelines' template (`QwenImageEditPipeline` and `QwenImageEditPlusPipeline` share
# it): the longer system prompt up to the user turn, which the real tokenizer makes 64 tokens of, and the
# edit pipelines drop 64 leading hidden states. After the user turn come the image placeholders (Edit:
# one `_IMAGE_PLACEHOLDER`; Edit Plus: "Picture N: " and the placeholder per image), then the instruction.
EDIT_PROMPT_TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a "
    "new image that meets the user's requirements while maintaining consistency with the original input "
    "where appropriate.<|im_end|>\n<|im_start|>user\n"
)
EDIT_PROMPT_TEMPLATE_PREFIX_TOKENS = 64
_IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

# Special tokens in the order (hence relative ids) of the real Qwen2/Qwen2.5-VL tokenizer, where they
# take ids 151643..151664 right after the BPE vocabulary. `True` = special (never split, skipped by
# `decode(skip_special_tokens=True)`); the tool/FIM markers are plain added tokens there, as here.
_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
# Listed as `extra_special_tokens` (transformers 5's name for `additional_special_tokens`), as in the
# released tokenizer_config.json; Qwen2-VL processors look up <|image_pad|>, <|video_pad|> and the
# vision start/end markers by these strings.
_EXTRA_SPECIAL_TOKENS = [tok for tok, special in _ADDED_TOKENS if special and tok != "<|endoftext|>"]

# Qwen2's pre-tokenizer split regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX,
# copied so that training does not need transformers; `build_tiny_tokenizer` checks they agree).
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# BPE training target. The corpus below runs out of pairs to merge first (at ~2.3k tokens), so every
# pre-tokenized word of the corpus ends up one token, on top of the 256 byte symbols.
_BPE_VOCAB_SIZE = 4096
# How often the template goes into the corpus: enough that its words are among the first merges even if
# the corpus ever grows past `_BPE_VOCAB_SIZE` (merge order follows pair frequency).
_TEMPLATE_REPEATS = 64

# A few hundred common English words, biased toward what image prompts say.
_ENGLISH_WORDS = """
a about above across after again against all almost along also always among an and animal another any
apple are area around art as at autumn away baby back background bag ball bank bar beach bear beautiful
bed before behind bell below beside best between bicycle big bird black blanket blue boat body book bottle
bowl box boy branch bread bridge bright brown building bus but butterfly by cake camera candle car card
castle cat chair child church city clean clear clock close cloud coat coffee cold color colorful cup dark
day deep desert detailed dinner dog door dragon dream dress drink during each early earth east empty
evening every eye face fall family far farm fast field fire fish five flag floor flower fly fog food for
forest four fox friend from front fruit full garden girl glass gold good grass gray great green ground
group hair half hand happy hat head heart heavy high hill his holding home horse hot house how ice in
inside into island it its jacket key kitchen lake lamp landscape large last late leaf left light like
line lion little long low machine man many map market moon morning mountain mouse music near neon new
night no north not ocean of office old on one open orange other out over painting paper park party path
people person photo photograph piano picture pink plant plate portrait purple quiet rain rainbow red
right river road robot rock roof room round running sand sea season sharp ship shirt shop short sign
silver simple sitting sky small smile snow soft south space spring square stairs standing star stone
street strong summer sun sunlight sunset table tall tea three through tiger to top tower town toy train
tree two under up very village wall warm water wave west white wild window winter with woman wood wooden
world yellow young
the of and a to in is was he for it with as his on be at by i had not are but from or have an they
which one you were her all she there would their we him been has when who will more no if out so said
what up its about into than them can only other new some could time these two may then do first any my
now such like our over man me even most made after also did many before must through back years where
much your way well down should because each just those people how too little state good very make world
still own see men work long get here between both life being under never day same another know while last
might us great old year off come since against go came right used take three
cinematic lighting realistic style illustration watercolor oil sketch render high quality resolution
close-up wide angle view shot soft focus bokeh golden hour studio dramatic shadow reflection glowing
misty foggy snowy rainy sunny cloudy stormy calm peaceful busy crowded ancient modern futuristic cute
sleeping flying swimming walking jumping reading playing cooking dancing singing laughing crying
"""

_ENGLISH_SENTENCES = """
A photograph of a cat sitting on a red chair next to a window.
A fox running through the snow under the moon, cinematic lighting.
An old wooden boat on a calm lake at sunset, watercolor painting.
A robot reading a book in a quiet library, soft light, high quality.
A bowl of fruit on a kitchen table: apples, oranges and a banana.
Two children playing in a green park in spring, with a dog and a ball.
A tall tower in a futuristic city at night, neon signs and rain.
Text "HELLO WORLD" written on a sign, 4K, 8K, 1024x1024, 16:9.
""".strip().splitlines()

# Chinese text: Qwen-Image is bilingual, and users' prompts often are Chinese (three UTF-8 bytes per
# character, so byte-level BPE has to merge bytes into characters first).
_CHINESE_TEXT = """
一只在月光下奔跑的狐狸。
一只猫坐在窗边的红色椅子上，阳光洒在地板上。
夕阳下平静的湖面上有一条旧木船，水彩画风格。
春天的公园里，两个孩子和一只小狗在草地上玩球。
夜晚的未来城市，高楼林立，霓虹灯在雨中闪烁。
古老的村庄坐落在山谷中，小河从石桥下流过，远处是雪山。
一位老人在茶馆里喝茶看书，窗外下着小雨。
桌子上有一碗水果：苹果、橙子和香蕉。
海边的灯塔在雾中发出温暖的光，海浪拍打着岩石。
穿着蓝色外套的女孩站在樱花树下微笑，背景是寺庙。
书法作品，上面写着“春风得意”四个大字。
秋天的森林里，金黄色的树叶落满了小路。
一只熊猫在竹林里吃竹子，可爱，高清摄影。
宇航员在月球上骑马，电影感灯光，超高清。
""".strip().splitlines()


# Edit instructions, for the edit flavours' tokenizer (so typical instructions are whole words, as with the
# real vocabulary), in English and Chinese.
_EDIT_INSTRUCTIONS = """
Make the square blue and keep the background.
Change the background to a clear summer sky.
Turn the circle into a yellow star.
Add the text "OPEN" on the sign above the door.
Remove the person on the left and fill the gap with grass.
Put the cat of picture 1 on the chair of picture 2.
Combine both pictures into one scene, in the style of picture 2.
把正方形改成蓝色，背景保持不变。
把背景换成晴朗的夏日天空。
在门上方的招牌上写“营业中”。
把图1中的猫放到图2的椅子上。
""".strip().splitlines()


def _templated(texts: list[str]) -> list[str]:
    """`texts` (prompts wrapped in a template) as training text, repeated so the template is frequent."""
    specials = re.compile("|".join(re.escape(tok) for tok, _ in _ADDED_TOKENS))
    # Special tokens are matched before pre-tokenization at encode time, so they never take part in BPE
    # merges; take them out of the training text the same way.
    pieces = [piece for text in texts for piece in specials.split(text) if piece]
    return pieces * (_TEMPLATE_REPEATS // len(texts) + 1)


def _training_corpus(task: str = GENERATE) -> list[str]:
    """The texts the tiny BPE for `task` is trained on (fixed, so training is deterministic)."""
    prompts = [*_ENGLISH_SENTENCES, *_CHINESE_TEXT]
    corpus = _templated([PROMPT_TEMPLATE_PREFIX + prompt + PROMPT_TEMPLATE_SUFFIX for prompt in prompts])
    words = _ENGLISH_WORDS.split()
    corpus.append(" ".join(words))
    corpus.append(" ".join(word.capitalize() for word in words))
    corpus.extend(_ENGLISH_SENTENCES)
    corpus.extend(_CHINESE_TEXT)
    if task != GENERATE:
        # The edit template with one image (Edit) and with two numbered ones (Edit Plus).
        pictures = f"Picture 1: {_IMAGE_PLACEHOLDER}Picture 2: {_IMAGE_PLACEHOLDER}"
        edit_prompts = [
            EDIT_PROMPT_TEMPLATE_PREFIX + images + instruction + PROMPT_TEMPLATE_SUFFIX
            for instruction in _EDIT_INSTRUCTIONS
            for images in (_IMAGE_PLACEHOLDER, pictures)
        ]
        corpus.extend(_templated(edit_prompts))
        corpus.extend(_EDIT_INSTRUCTIONS)
    return corpus


def _train_bpe(task: str = GENERATE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a Qwen2-style byte-level BPE on the embedded corpus for `task`; return (vocab, merges)."""
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # Same normalizer and pre-tokenizer as transformers' Qwen2Tokenizer builds around vocab/merges.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        # All 256 byte symbols, so any UTF-8 text (Chinese, emoji) is encodable, as with the real vocab.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # Training involves no randomness; its output was checked to be identical across processes with
    # different hash seeds (Rust hash maps are seeded per process), and tests keep checking that.
    tokenizer.train_from_iterator(_training_corpus(task), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return vocab, merges


def build_tiny_tokenizer(task: str = GENERATE) -> transformers.PreTrainedTokenizerBase:
    """A ``Qwen2Tokenizer`` with a ~2.3k byte-level BPE vocabulary whose template prefix is 34 tokens.

    For the edit tasks, the vocabulary also covers the edit template, whose prefix is then 64 tokens.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2 import tokenization_qwen2

    if tokenization_qwen2.PRETOKENIZE_REGEX.replace("\n", "") != _QWEN2_PRETOKENIZE_REGEX:
        raise RuntimeError("transformers' Qwen2 pre-tokenizer regex changed; update _QWEN2_PRETOKENIZE_REGEX")

    _check_task(task)
    vocab, merges = _train_bpe(task)
    # Special tokens go right after the BPE vocabulary, in the real tokenizer's order. Putting them in
    # the model vocabulary too (not only as added tokens) pins their ids when the tokenizer is reloaded.
    for token, _ in _ADDED_TOKENS:
        vocab[token] = len(vocab)

    # `Qwen2Tokenizer.__init__` always rebuilds its backend from vocab/merges with its own normalizer and
    # pre-tokenizer (also when loading tokenizer.json), so building it the same way here guarantees the
    # in-memory and the reloaded tokenizer behave identically. Settings follow the released
    # tokenizer_config.json: no BOS, EOS <|im_end|>, pad <|endoftext|>, no unk, right padding.
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=_EXTRA_SPECIAL_TOKENS,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        add_prefix_space=False,
        padding_side="right",
        # The pipeline tokenizes up to tokenizer_max_length + 34 = 1058 tokens; 131072 as released.
        model_max_length=131072,
    )
    tokenizer.add_tokens([AddedToken(tok, special=special, normalized=False) for tok, special in _ADDED_TOKENS])
    for token, _ in _ADDED_TOKENS:
        if tokenizer.convert_tokens_to_ids(token) != vocab[token]:
            raise RuntimeError(f"special token {token} did not keep its id {vocab[token]}")

    _check_template_prefix(tokenizer, PROMPT_TEMPLATE_PREFIX, PROMPT_TEMPLATE_PREFIX_TOKENS)
    if task != GENERATE:
        _check_template_prefix(tokenizer, EDIT_PROMPT_TEMPLATE_PREFIX, EDIT_PROMPT_TEMPLATE_PREFIX_TOKENS)
    return tokenizer


def _check_task(task: str) -> None:
    if task not in TINY_MODEL_TASKS:
        raise ConfigError(f"unknown tiny model task {task!r}: use one of {', '.join(TINY_MODEL_TASKS)}")


def _check_template_prefix(tokenizer, prefix: str, n_tokens: int) -> None:
    """Raise unless `prefix` is `n_tokens` tokens and stays so whatever prompt follows it."""
    prefix_ids = tokenizer(prefix, add_special_tokens=False).input_ids
    if len(prefix_ids) != n_tokens:
        pieces = tokenizer.convert_ids_to_tokens(prefix_ids)
        raise RuntimeError(f"template prefix is {len(prefix_ids)} tokens, not {n_tokens}: {pieces}")
    # "Picture 1: " is how the Edit Plus template goes on after the prefix.
    for prompt in ("A cat", " ", "一只猫", "relationships", "Picture 1: "):
        ids = tokenizer(prefix + prompt + PROMPT_TEMPLATE_SUFFIX, add_special_tokens=False).input_ids
        if ids[:n_tokens] != prefix_ids:
            raise RuntimeError(f"the prompt {prompt!r} merges with the template prefix")


# VAE width. The released base_dim is 96 (channels 96/192/384/384). The first encoder stage and the last
# decoder stage run at full image resolution with base_dim channels, so this sets the decode cost; the
# decoder's upsampling convolutions halve channels and its RMS norms normalize over channels, and 2 is
# the smallest base_dim for which no RMS norm sees a single channel (where it degenerates to sign(x)).
_VAE_BASE_DIM = 2

# Gain of the text-stream key RMS norm (`attn.norm_added_k.weight`, 1.0 at init) in each transformer
# block. The default init does not give constant images (the seed changes a 256x256 image by ~20/255 on
# average), but the prompt barely matters: ~10 text keys compete with 256 image keys for attention on an
# equal footing, and another prompt moves the image by only ~0.35/255 (true CFG included), too little
# for tests to tell "another prompt" from numerical noise. Queries and keys are RMS-normalized after
# projection, so scaling `add_k_proj` would be undone; the norm gain is the knob that makes text keys
# win attention. With 4, another prompt moves the image by ~5/255 and one changed word by ~3/255, and
# brightness and contrast of the images stay as they were.
_TEXT_KEY_GAIN = 4.0


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for module construction without touching the caller's RNG state.

    Module constructors draw their initial weights from the global generator (there is no generator
    argument), so fork it: the state is restored on exit. Also pins the device to CPU, whatever the
    caller's default device.
    """
    import torch

    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        yield


def _text_encoder_config(tokenizer) -> transformers.Qwen2_5_VLConfig:
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text_config = {
        # Qwen2.5-VL-7B: hidden 3584, 28 layers, 28 heads, 4 KV heads (GQA), intermediate 18944.
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,  # keep grouped-query attention (2 query heads per KV head), as released
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 28,  # as released; unused while use_sliding_window is False
        "attention_dropout": 0.0,
        # Multimodal RoPE: the sections split head_dim / 2 = 8 frequencies into (temporal, h, w),
        # [16, 24, 24] for the real head_dim of 128.
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
    }
    vision_config = {
        # Qwen2.5-VL-7B: depth 32, hidden 1280, 16 heads, intermediate 3420.
        "depth": 2,
        "hidden_size": 32,
        "hidden_act": "silu",
        "intermediate_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "out_hidden_size": 32,  # = text hidden size: merged patches are fed to the language model
        "fullatt_block_indexes": [1],  # window attention elsewhere, as [7, 15, 23, 31] of 32 blocks
        "initializer_range": 0.02,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )


def _build_text_encoder(tokenizer, seed: int):
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = _text_encoder_config(tokenizer)
    with _seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.eval()


def _build_transformer(joint_attention_dim: int, seed: int):
    import torch
    from diffusers import QwenImageTransformer2DModel

    with _seeded(seed):
        # Released: 60 layers, 24 heads of 128 (inner dim 3072), joint_attention_dim 3584, rope axes
        # (16, 56, 56). Patch size, latent channels (16, packed 2x2 into 64) and the flags are kept.
        # Two heads keep the multi-head code paths; 16 dims each because on a CPU the attention over
        # 4,096+ image tokens dominates the tiny model's cost (the demo runs 50 steps at up to 1664x928).
        model = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=joint_attention_dim,
            guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),  # (frame, height, width); must sum to attention_head_dim
        )
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.attn.norm_added_k.weight.fill_(_TEXT_KEY_GAIN)
    return model.eval()


def _build_vae(seed: int):
    from diffusers import AutoencoderKLQwenImage

    with _seeded(seed):
        # Released: base_dim 96, num_res_blocks 2. z_dim, dim_mult, temperal_downsample (3 downsamplings:
        # VAE scale factor 8) and latents_mean/latents_std (the defaults are the released values) kept.
        model = AutoencoderKLQwenImage(
            base_dim=_VAE_BASE_DIM,
            z_dim=16,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True],
            dropout=0.0,
        )
    return model.eval()


def _build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # The released scheduler_config.json of Qwen/Qwen-Image, verbatim.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        invert_sigmas=False,
        shift_terminal=0.02,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        time_shift_type="exponential",
        stochastic_sampling=False,
    )


# The released Qwen2.5-VL image processor settings (preprocessor_config.json): images are resized to
# multiples of 28 pixels (14-pixel patches, merged 2x2 into one text-encoder token) with between 3,136 and
# 12,845,056 pixels (4 to 16,384 tokens), and normalized with the CLIP mean and std.
_IMAGE_PROCESSOR_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "merge_size": 2,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "resample": 3,  # bicubic
    "rescale_factor": 1 / 255,
}
# The user turn's header: the edit pipelines drop the hidden states up to and including it.
_USER_TURN = "<|im_start|>user\n"


def build_tiny_processor(tokenizer) -> transformers.Qwen2VLProcessor:
    """The ``Qwen2VLProcessor`` the edit pipelines feed images and text through, around `tokenizer`.

    Nothing in it is tiny or random: it is the released processor's configuration.
    """
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    # The released processor has a video processor too (it is Qwen2.5-VL's); the pipelines never use it,
    # but transformers 5 builds one whenever it loads the processor, so it is saved with the rest.
    video_processor = Qwen2VLVideoProcessor(
        **{key: _IMAGE_PROCESSOR_CONFIG[key] for key in ("patch_size", "temporal_patch_size", "merge_size")}
    )
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**_IMAGE_PROCESSOR_CONFIG),
        tokenizer=tokenizer,
        video_processor=video_processor,
    )


def build_tiny_pipeline(seed: int = TINY_MODEL_SEED, task: str = GENERATE) -> diffusers.DiffusionPipeline:
    """Build the tiny pipeline for `task` (see `TINY_MODEL_TASKS`) on CPU (float32, torch's default dtype).

    Each model's weights are drawn with torch seeded to `seed`; the caller's global RNG state is untouched.
    """
    import diffusers

    _check_task(task)
    tokenizer = build_tiny_tokenizer(task)
    text_encoder = _build_text_encoder(tokenizer, seed)
    components = {
        "scheduler": _build_scheduler(),
        "vae": _build_vae(seed),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": _build_transformer(text_encoder.config.text_config.hidden_size, seed),
    }
    if task != GENERATE:
        components["processor"] = build_tiny_processor(tokenizer)
    pipe = getattr(diffusers, TINY_MODEL_TASKS[task])(**components)
    # Check the tokenizer against the template and drop count this diffusers version actually uses.
    template = pipe.prompt_template_encode
    prefix = template[: template.index(_USER_TURN) + len(_USER_TURN)]
    _check_template_prefix(tokenizer, prefix, pipe.prompt_template_encode_start_idx)
    return pipe


def write_tiny_model(directory: str | pathlib.Path, seed: int = TINY_MODEL_SEED, task: str = GENERATE) -> pathlib.Path:
    """Write the tiny pipeline for `task` to `directory` in diffusers format (safetensors); return the folder.

    `task` is "generate" (text to image: `QwenImagePipeline`), "edit" (`QwenImageEditPipeline`) or "edit-plus"
    (`QwenImageEditPlusPipeline`); each loads with its class's `from_pretrained(directory)`.
    """
    directory = pathlib.Path(directory)
    pipe = build_tiny_pipeline(seed, task)
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory, safe_serialization=True)
    return apply_umask(directory, folder_itself=False)


def tiny_model_revision(task: str = GENERATE) -> str:
    """The builder revision of `task`'s tiny model: a cached copy built at another revision is stale."""
    _check_task(task)
    if task == GENERATE:
        return str(TINY_MODEL_REVISION)
    return f"{TINY_MODEL_REVISION}.{TINY_EDIT_MODEL_REVISION}"
