"""bench/quickstart_samples.py judges a run's samples by their border colour, as documented."""

import importlib.util
import sys

from PIL import Image

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import quickstart_samples as judge  # noqa: E402

PROMPTS = ("a_red_circle_on_a_blue_background", "a_blue_square_on_an_orange_background")


def _sample(folder, step, i, prompt, border, centre=(220, 30, 30)):
    im = Image.new("RGB", (128, 128), border)
    im.paste(Image.new("RGB", (64, 64), centre), (32, 32))  # a big shape does not move the verdict
    im.save(folder / f"gs{step:06d}-live-{i:02d}-{prompt}.png")


def test_last_samples_must_show_their_backgrounds_and_the_first_must_not(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    for i, prompt in enumerate(PROMPTS):
        _sample(samples, 0, i, prompt, (200, 140, 40))  # step 0: both near orange, one by chance right
    _sample(samples, 100, 0, PROMPTS[0], (40, 70, 200))
    _sample(samples, 100, 1, PROMPTS[1], (230, 120, 30))
    assert judge.prompted_background(next(samples.glob("gs000100-live-00-*"))) == "blue"
    assert judge.report(tmp_path)
    _sample(samples, 100, 1, PROMPTS[1], (150, 50, 170))  # purple where orange was prompted
    assert not judge.report(tmp_path)
    _sample(samples, 100, 1, PROMPTS[1], (230, 120, 30))
    _sample(samples, 0, 0, PROMPTS[0], (40, 70, 200))  # step 0 already right everywhere: no learning shown
    assert not judge.report(tmp_path)


def test_palette_is_the_generators_colours_of_the_sample_prompts_backgrounds():
    spec = importlib.util.spec_from_file_location("make_example_data", ROOT / "data" / "make_example_data.py")
    data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data)
    backgrounds = [p.split(" on ")[1].split()[-2] for p in data.PROMPTS]
    assert {name: data.COLOURS[name] for name in backgrounds} == judge.PALETTE
    assert (ROOT / "data" / "sample_prompts.txt").read_text().splitlines() == list(data.PROMPTS)
