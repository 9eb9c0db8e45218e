"""Speech intelligibility: dialogue extraction, normalisation, WER/CER against jiwer and torchmetrics, and real
synthesized speech (Debian flite) transcribed by a real offline ASR (pocketsphinx's built-in English model)."""

import shutil
import subprocess
import wave

import numpy as np
import pytest

pytest.importorskip("jiwer", reason="the eval extra is not installed: pip install -e '.[eval]'")

from magi_train.eval.speech import aggregate, prompt_reference, score_transcript
from magi_train.eval.text import extract_dialogue, language_code, normalize_text

PROMPT = """A man and a woman talk in a kitchen. Medium shot, warm light.

Dialogue:
<Young woman, calm, English>: "Would you like a cup of coffee?"
<Man, English>: “Yes, please — and don't forget the milk!”

Background Sound:
<Quiet kitchen ambience>
"""


def test_dialogue_lines_speakers_and_languages():
    lines = extract_dialogue(PROMPT)
    assert [(line.speaker, line.language) for line in lines] == [("Young woman, calm", "en"), ("Man", "en")]
    assert lines[1].text == "Yes, please — and don't forget the milk!"
    ref, lang = prompt_reference(PROMPT)
    assert lang == "en" and ref.startswith("Would you like") and ref.endswith("milk!")
    # the release's example format for silent clips, and a header with the line on the same line
    assert extract_dialogue("Body.\n\nDialogue:\n<No dialogue>\n\nBackground Sound:\n<Wind>") == []
    same_line = extract_dialogue('Dialogue: <Vendor, Mandarin>: "新鲜的水果！"')
    assert [(x.language, x.text) for x in same_line] == [("zh", "新鲜的水果！")]
    mixed = 'Dialogue:\n<A, English>: "hello"\n<B, Japanese>: 「こんにちは」'
    assert prompt_reference(mixed) == ("hello こんにちは", "mixed")
    assert language_code(" Cantonese ") == "yue" and language_code("Klingon") == "klingon"
    # lines outside the Dialogue block are not speech
    assert extract_dialogue('Background Sound:\n<Man, English>: "not dialogue"') == []


def test_normalisation():
    assert (
        normalize_text("Yes, please — and DON'T forget: the milk!", "en")
        == "yes please and dont forget the milk"
    )
    assert normalize_text("ｆｕｌｌ　ｗｉｄｔｈ", "en") == "full width"  # NFKC
    assert normalize_text("今天，天气 很好！", "zh") == "今天天气很好"  # CJK: punctuation and spaces dropped
    assert normalize_text("안녕하세요, 반갑습니다.", "ko") == "안녕하세요반갑습니다"
    assert normalize_text("Ça va? Très bien.", "fr") == "ça va très bien"
    pytest.importorskip("whisper_normalizer")
    assert normalize_text("Mr. Smith paid $20.", "en", "whisper") == "mister smith paid $20"
    assert normalize_text("Bonjour!", "fr", "whisper") == "bonjour"  # other languages stay basic
    with pytest.raises(ValueError, match="unknown normalizer"):
        normalize_text("x", "en", "fancy")


def test_cjk_cer_equals_hand_computed_value():
    # 今天天气很好 (6 chars) vs 今天天汽很好啊: one substitution (气->汽) + one insertion (啊) = 2 / 6
    s = score_transcript("zh", "今天天气很好。", "今天天汽很好啊", "zh")
    assert (s.unit, s.substitutions, s.deletions, s.insertions, s.reference_units) == ("char", 1, 0, 1, 6)
    assert s.rate == pytest.approx(2 / 6)
    # Japanese: まもなく電車が参ります (11 chars) vs まもなく電車がまいります: 参 -> まい is 1 sub + 1 ins
    s = score_transcript("ja", "まもなく電車が参ります。", "まもなく電車がまいります", "ja")
    assert (s.substitutions, s.insertions, s.deletions, s.reference_units) == (1, 1, 0, 11)
    # Korean scored per character, spaces ignored: 반갑습니다 vs 반갑습니 = one deletion of 5 (+ 안녕 2) = 1 / 7
    s = score_transcript("ko", "안녕 반갑습니다", "안녕반갑습니", "ko")
    assert (s.errors, s.reference_units, s.unit) == (1, 7, "char")


def test_corpus_aggregation_matches_jiwer_and_torchmetrics():
    import jiwer
    from torchmetrics.functional.text import char_error_rate, word_error_rate

    en = [("a", "the cat sat on the mat", "the cat sat on a mat"), ("b", "hello world", "hello there world"),
          ("c", "one two three four five six seven", "one two four five six")]  # fmt: skip
    zh = [("d", "今天天气很好", "今天天汽很好啊"), ("e", "我们去公园", "我们去公园")]
    scores = [score_transcript(i, r, h, "en") for i, r, h in en] + [
        score_transcript(i, r, h, "zh") for i, r, h in zh
    ]
    agg = aggregate(scores, n_resamples=200)
    en_refs, en_hyps = [r for _, r, _ in en], [h for _, _, h in en]
    zh_refs, zh_hyps = [r for _, r, _ in zh], [h for _, _, h in zh]
    en_rate = agg["by_language"]["en"]["rate"]["value"]
    assert en_rate == pytest.approx(jiwer.wer(en_refs, en_hyps))
    assert en_rate == pytest.approx(float(word_error_rate(en_hyps, en_refs)))
    assert agg["by_language"]["zh"]["rate"]["value"] == pytest.approx(
        float(char_error_rate(zh_hyps, zh_refs))
    )
    # corpus level, not a mean of clip rates: total edits / total reference units
    w, c = jiwer.process_words(en_refs, en_hyps), jiwer.process_characters(zh_refs, zh_hyps)
    edits = w.substitutions + w.deletions + w.insertions + c.substitutions + c.deletions + c.insertions
    units = (w.hits + w.substitutions + w.deletions) + (c.hits + c.substitutions + c.deletions)
    assert agg["overall"]["rate"]["value"] == pytest.approx(edits / units)
    assert agg["overall"]["rate"]["value"] != pytest.approx(np.mean([s.rate for s in scores]))
    assert agg["overall"]["unit"] == "mixed" and agg["by_language"]["en"]["unit"] == "word"
    low, high = agg["overall"]["rate"]["low"], agg["overall"]["rate"]["high"]
    assert low <= agg["overall"]["rate"]["value"] <= high
    assert score_transcript("x", " ,. ", "anything", "en") is None  # no reference -> not scored


# ------------------------------------------------------------------------------------------------------
# Real speech: flite (Debian) -> mp4 (AAC, 44.1 kHz) -> pocketsphinx

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "i would like a cup of coffee and a glass of water",
    "the weather is very nice today",
    "she sells sea shells by the sea shore",
]


@pytest.fixture(scope="module")
def spoken_clips(tmp_path_factory):
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed (Debian: apt-get install -y flite)")
    pytest.importorskip("pocketsphinx", reason="pocketsphinx is not installed (pip install -e '.[eval]')")
    from scipy.signal import resample_poly

    from magi_train.codecs import write_audio_video_mp4

    root = tmp_path_factory.mktemp("speech")
    clips = []
    for i, text in enumerate(SENTENCES):
        wav = root / f"{i}.wav"
        subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", str(wav)], check=True)
        with wave.open(str(wav)) as w:
            rate = w.getframerate()
            mono = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
        assert rate == 16000
        out = resample_poly(mono, 441, 160).astype(np.float32)  # 16 kHz -> 44.1 kHz, as generated clips have
        frames = np.zeros((int(np.ceil(len(out) / 44100 * 25)) + 1, 32, 32, 3), np.uint8)
        path = write_audio_video_mp4(root / f"{i}.mp4", frames, np.stack([out, out]))
        prompt = f'A person speaks.\n\nDialogue:\n<Person, English>: "{text.capitalize()}."\n\nBackground Sound:\n<None>'
        clips.append((path, prompt))
    return clips


def test_real_speech_wer_low_for_matching_and_high_for_mismatched_references(spoken_clips):
    from magi_train.eval.asr import load_asr
    from magi_train.eval.runner import score_clip
    from magi_train.eval.suite import SuitePrompt

    asr = load_asr("pocketsphinx")
    matched, transcripts = [], []
    for k, (path, prompt) in enumerate(spoken_clips):
        record, speech = score_clip(SuitePrompt(f"c{k}", prompt), str(path), None, asr, "basic")
        matched.append(speech)
        transcripts.append(record["transcript"])
    rate = aggregate(matched, n_resamples=200)["overall"]["rate"]["value"]
    assert rate < 0.25, (rate, transcripts)
    # the same transcripts against the other clips' references
    n = len(SENTENCES)
    mismatched = [score_transcript(f"m{k}", SENTENCES[(k + 1) % n], transcripts[k], "en") for k in range(n)]
    assert aggregate(mismatched, n_resamples=200)["overall"]["rate"]["value"] > 0.8


def test_pocketsphinx_refuses_other_languages_and_the_runner_skips_them(spoken_clips):
    from magi_train.eval.asr import load_asr
    from magi_train.eval.runner import score_clip
    from magi_train.eval.suite import SuitePrompt

    asr = load_asr("pocketsphinx")
    with pytest.raises(ValueError, match="English only"):
        asr.transcribe(np.zeros(16000, np.float32), "zh")
    prompt = 'Dialogue:\n<Man, Mandarin>: "你好"'
    record, speech = score_clip(SuitePrompt("zh", prompt), str(spoken_clips[0][0]), None, asr, "basic")
    assert speech is None and "does not transcribe 'zh'" in record["speech_skipped"]


def test_asr_backend_errors(tmp_path):
    from magi_train.eval.asr import load_asr

    with pytest.raises(ValueError, match="unknown ASR backend"):
        load_asr("kaldi")
    with pytest.raises(ValueError, match="not found"):
        load_asr("whisper", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs a local model directory"):
        load_asr("glm_asr", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_asr("whisper", str(tmp_path / "empty"))
    assert load_asr("none") is None


def test_whisper_backend_through_the_transformers_pipeline(tmp_path):
    """The `whisper` backend on a tiny random multilingual Whisper: loading, language and task ids, resampling
    rate and the 30-second chunking of long audio (the transcripts of a random model are noise)."""
    from magi_train.eval.asr import load_asr
    from tests.fixtures.tiny_models import write_tiny_whisper

    asr = load_asr("whisper", str(write_tiny_whisper(tmp_path / "whisper")), device="cpu")
    assert asr.sample_rate == 16000 and asr.languages is None and asr.name == "whisper"
    noise = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    for language in ("en", "zh", "mixed", None):
        assert isinstance(asr.transcribe(noise, language), str)
    assert isinstance(asr.transcribe(np.tile(noise, 35), "ja"), str)  # 35 s: chunked
