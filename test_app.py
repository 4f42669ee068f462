"""Tier 1: the local app (app.py) run as users run it, on the small model: what it writes
is what txt2audio.py writes; its queue; its refusals, in the command line's words; what it
must not serve or take; audio to audio from uploads; and the page in a real browser."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import HERE, _txt2audio, full_disk

# ---------------------------------------------------------------- tier 1: the local app (app.py)


class AppServer:
    """app.py run as users run it, on the small model: its address, output folder and process."""

    def __init__(
        self,
        model: Path,
        output_dir: Path,
        *args,
        host="127.0.0.1",
        env=None,
        cwd: Path = None,
    ):
        """With `cwd`, app.py runs there and is given `output_dir` relative to it."""
        self.output_dir, self.host = output_dir, host
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "app.py"),
                "--model",
                str(model),
                "--host",
                host,
                "--port",
                "0",
                "--output-dir",
                str(output_dir.relative_to(cwd) if cwd else output_dir),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=cwd,
        )
        self.lines = []
        for (
            line
        ) in self.process.stdout:  # the process prints its address once it listens
            self.lines.append(line)
            if match := re.search(r"Serving on (http://(\S+):(\d+)) ", line):
                self.url, self.address, self.port = match[1], match[2], int(match[3])
                return
        raise AssertionError(f"app.py did not start: {''.join(self.lines)}")

    def request(self, method: str, path: str, body=None, headers=None, send_body=True):
        """(status, parsed JSON or bytes, headers) of one request, its path sent exactly as given."""
        import http.client

        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        headers = dict(headers or {})
        if isinstance(body, (dict, list, str)) and "Content-Type" not in headers:
            body, headers["Content-Type"] = (
                json.dumps(body).encode(),
                "application/json",
            )
        elif isinstance(body, str):
            body = body.encode()
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", headers.pop("Host", f"{self.address}:{self.port}"))
        if body is not None and "Content-Length" not in headers:
            headers["Content-Length"] = str(len(body))
        for k, v in headers.items():
            connection.putheader(k, v)
        connection.endheaders(body if body is not None and send_body else None)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        if response.getheader("Content-Type", "").startswith("application/json"):
            data = json.loads(data)
        return response.status, data, response

    def generate(self, **form):
        status, job, _ = self.request(
            "POST", "/api/generate", {"prompt": "warm pads", **form}
        )
        assert status == 200, job
        return job

    def wait(self, job_id: str, until=("done", "failed", "cancelled"), timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job, _ = self.request("GET", f"/api/jobs/{job_id}")
            assert status == 200
            if job["state"] in until if isinstance(until, tuple) else until(job):
                return job
            time.sleep(0.05)
        raise AssertionError(
            f"generation {job_id} still {job['state']} after {timeout} s"
        )

    def alive(self) -> bool:
        return self.process.poll() is None and self.request("GET", "/")[0] == 200

    def stop(self, signum=None) -> str:
        """Its whole log, once `signum` (default SIGTERM) has ended it."""
        import signal

        self.process.send_signal(signum or signal.SIGTERM)
        try:
            rest = self.process.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        return "".join(self.lines) + rest


@pytest.fixture(scope="module")
def app_server(small_converted, tmp_path_factory):
    folder = tmp_path_factory.mktemp("app")  # its output folder is given as `outputs`
    server = AppServer(
        small_converted, folder / "outputs", "--max-upload-mb", "0.05", cwd=folder
    )
    yield server
    log = server.stop()
    assert (
        server.process.returncode == 0 and "Traceback" not in log
    ), log  # SIGTERM ends it cleanly


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_the_page_names_the_model_not_its_path(
    app_server, small_converted, tmp_path, monkeypatch
):
    """The header names the model by its folder's own name or its Hub repo's name, never
    the path to it (which the README's screenshot once showed)."""
    import app

    status, info, _ = app_server.request("GET", "/api/info")
    assert status == 200 and info["model"] == small_converted.name == "mlx_model"
    assert info["output_dir"] == "outputs"  # as given
    folder = tmp_path / "my model"
    folder.mkdir()
    for given, shown in (
        (str(small_converted), "mlx_model"),
        (f"{small_converted}/", "mlx_model"),
        (f"{small_converted}/../mlx_model", "mlx_model"),
        (str(folder), "my model"),
        ("stabilityai/stable-audio-open-1.0", "stable-audio-open-1.0"),
        ("stabilityai/stable-audio-open-small", "stable-audio-open-small"),
    ):
        assert app.model_name(given) == shown, given
    monkeypatch.chdir(folder)
    assert app.model_name(".") == "my model"


def test_app_writes_what_txt2audio_writes(app_server, small_converted, tmp_path):
    """A generation through the page's API: its progress counts the sampler's steps, and its
    wav is byte for byte txt2audio's with the same settings, beside its spectrogram and
    settings; /results/ serves them (whole, or the byte range a media element asks for).
    """
    import soundfile as sf

    job = app_server.generate(seconds_total="0.01", steps="4", seed="3", format="wav")
    assert job["state"] in ("queued", "running") and job["settings"]["seed"] == 3
    done = app_server.wait(job["id"])
    assert done["state"] == "done" and (done["step"], done["total"]) == (4, 4)
    (result,) = done["results"]
    out = tmp_path / "cli.wav"
    cli = _txt2audio(
        "warm pads",
        "--model",
        str(small_converted),
        "--seconds-total",
        "0.01",
        "--steps",
        "4",
        "--seed",
        "3",
        "--output",
        str(out),
    )
    assert cli.returncode == 0, cli.stderr
    written = app_server.output_dir / result["name"]
    assert written.read_bytes() == out.read_bytes()
    audio, rate = sf.read(written)
    assert (
        rate == 44100
        and audio.shape == (441, 2)
        and result["seconds"] == pytest.approx(0.01)
    )
    status, served, _ = app_server.request("GET", result["audio"])
    assert status == 200 and served == written.read_bytes()
    status, part, response = app_server.request(
        "GET", result["audio"], headers={"Range": "bytes=4-11"}
    )
    assert (
        status == 206
        and part == served[4:12]
        and response.getheader("Content-Range") == f"bytes 4-11/{len(served)}"
    )
    status, picture, response = app_server.request("GET", result["spectrogram"])
    assert status == 200 and response.getheader("Content-Type") == "image/svg+xml"
    assert picture == written.with_suffix(".svg").read_bytes()
    assert b'<text class="frequency"' in picture and b"base64," in picture  # axes
    settings = json.loads(written.with_suffix(".json").read_text())
    assert (
        settings["prompt"] == "warm pads"
        and settings["seed"] == 3
        and settings["steps"] == 4
    )
    status, history, _ = app_server.request("GET", "/api/history")
    assert result["name"] in [r["name"] for r in history]
    # a seamless loop: two passes of the sampler, as txt2audio makes it
    done = app_server.wait(
        app_server.generate(seconds_total="0.01", steps="3", seed="4", loop=True)["id"]
    )
    assert done["state"] == "done" and done["total"] == 6, done["error"]
    cli = _txt2audio(
        "warm pads",
        "--model",
        str(small_converted),
        "--seconds-total",
        "0.01",
        "--steps",
        "3",
        "--seed",
        "4",
        "--loop",
        "--output",
        str(out),
    )
    assert cli.returncode == 0, cli.stderr
    assert (
        app_server.output_dir / done["results"][0]["name"]
    ).read_bytes() == out.read_bytes()
    # flac, two at once: numbered, and the same seed again is written beside, never over
    done = app_server.wait(
        app_server.generate(
            seconds_total="0.01", steps="2", seed="3", batch_size="2", format="flac"
        )["id"]
    )
    names = [r["name"] for r in done["results"]]
    assert len(names) == 2 and all(
        n.endswith(".flac") and n != result["name"] for n in names
    )
    assert all(sf.read(app_server.output_dir / n)[0].shape == (441, 2) for n in names)


def test_app_queues_cancels_and_never_overwrites(app_server):
    """Requests made at once all finish, one at a time, into files of their own (the same
    seed in the same second included); a queued generation is cancelled before it runs,
    a running one between two steps; the server goes on."""
    import concurrent.futures

    long = app_server.generate(seconds_total="0.01", steps="10000", seed="1")
    running = app_server.wait(
        long["id"], until=lambda j: j["state"] == "running" and j["step"] > 0
    )
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = list(
            pool.map(
                lambda _: app_server.generate(
                    seconds_total="0.01", steps="2", seed="5"
                ),
                range(4),
            )
        )
    positions = sorted(
        app_server.request("GET", f"/api/jobs/{j['id']}")[1]["position"] for j in jobs
    )
    assert positions == [1, 2, 3, 4]  # all four wait behind the long one, in order
    victim = jobs.pop()
    assert (
        app_server.request("POST", f"/api/jobs/{victim['id']}/cancel")[1]["state"]
        == "cancelled"
    )
    status, cancelled, _ = app_server.request("POST", f"/api/jobs/{long['id']}/cancel")
    assert status == 200
    cancelled = app_server.wait(long["id"])
    assert (
        cancelled["state"] == "cancelled"
        and running["step"] <= cancelled["step"] < 10000
        and not cancelled["results"]
    )
    finished = [app_server.wait(j["id"]) for j in jobs]
    assert all(j["state"] == "done" for j in finished)
    names = [j["results"][0]["name"] for j in finished]
    assert len(set(names)) == 3 and all(
        (app_server.output_dir / n).is_file() for n in names
    )
    assert (
        app_server.wait(victim["id"])["state"] == "cancelled"
        and not app_server.wait(victim["id"])["results"]
    )
    assert app_server.request("POST", "/api/jobs/ffff/cancel")[0] == 404
    assert app_server.alive()


@pytest.mark.parametrize(
    "form, argument, cli",
    [
        (dict(steps="0"), "steps", ["--steps", "0"]),
        (dict(seconds_total="600"), "seconds_total", ["--seconds-total", "600"]),
        (dict(seconds_total="NaN"), "seconds_total", ["--seconds-total", "nan"]),
        (dict(sampler="ddim"), "sampler", ["--sampler", "ddim"]),
        (dict(seed="-1"), "seed", ["--seed", "-1"]),
        (dict(batch_size="0"), "batch_size", ["--n-audios", "0"]),
        (dict(cfg_scale="inf"), "cfg_scale", ["--cfg-scale", "inf"]),
        (
            dict(seconds_total="1", overlap="5"),
            "overlap",
            ["--seconds-total", "1", "--overlap", "5"],
        ),
        (dict(loop=True, seconds_total="1"), "loop", None),
        (
            dict(loop=True, seconds_total="", bpm="1000", bars="1"),
            "bpm",
            ["--loop", "--bpm", "1000", "--bars", "1"],
        ),
        (dict(bpm="120", bars="4"), "bpm", None),
        (dict(loop=True, bpm="120"), "bars", None),
        (dict(steps="1.5"), "steps", None),
        (dict(prompt=""), "prompt", None),
        (dict(prompt="\ud800"), "prompt", None),
        (dict(mode="variation"), "upload", None),
        (dict(mode="paint"), "mode", None),
        (dict(format="ogg"), "format", None),
    ],
)
def test_app_refuses_bad_values_as_the_command_line_does(
    app_server, small_converted, tmp_path, form, argument, cli
):
    """Each value the checks refuse comes back as a 400 naming its field, with the line the
    command line prints for the same value (for a number that is not finite, the command
    line's argparse refuses it, in its own words); nothing is queued or written."""
    before = _files(app_server.output_dir)
    status, body, _ = app_server.request(
        "POST",
        "/api/generate",
        {"prompt": "warm pads", "seconds_total": "0.01", **form},
    )
    assert (
        status == 400 and body["field"] == argument and "\n" not in body["error"]
    ), body
    if cli is not None:
        result = _txt2audio(
            "warm pads",
            "--model",
            str(small_converted),
            "--output",
            str(tmp_path / "x.wav"),
            *cli,
        )
        if body["error"] == f"{argument} must be a finite number.":
            flag = cli[0]
            assert result.stderr.strip() == (
                f"error: argument {flag}: expected a finite number, not {cli[1]!r} (see"
                " --help)"
            )
        else:
            assert result.stderr.strip() == f"error: {body['error']}"
    assert _files(app_server.output_dir) == before and app_server.alive()


def test_app_refuses_what_it_must_not_serve_or_take(
    app_server, small_converted, audio_files
):
    """Only the page, its two files and this run's results are served: traversal in every
    spelling, folders and other Hosts are refused; uploads are bounded, of a type a web
    page cannot send unasked, and read by soundfile (its own message if it cannot); the
    process survives each."""
    assert (
        app_server.request("GET", "/")[0] == 200
        and b"Generate" in app_server.request("GET", "/")[1]
    )
    assert (
        app_server.request("GET", "/app.js")[0]
        == app_server.request("GET", "/style.css")[0]
        == 200
    )
    secret = app_server.output_dir.parent / "secret.txt"
    secret.write_text("private")
    for path in [
        "/../README.md",
        "/app.py",
        "/web/index.html",
        "/web/",
        "/results/",
        "/results",
        "/results/../secret.txt",
        "/results/..%2fsecret.txt",
        "/results/%2e%2e/secret.txt",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/results/" + str(secret),
        "//etc/passwd",
        "/results/%2Fetc%2Fpasswd",
        "/results/.\\..\\secret.txt",
        "/api/jobs/../../app.py",
        "/results/secret.txt",
    ]:
        status, body, _ = app_server.request("GET", path)
        assert status == 404 and b"private" not in json.dumps(body).encode(), path
    assert (
        app_server.request("GET", "/", headers={"Host": "attacker.example:80"})[0]
        == 400
    )  # DNS rebinding
    assert app_server.request("PUT", "/")[0] == 501
    assert (
        app_server.request(
            "POST",
            "/api/generate",
            "not json",
            headers={"Content-Type": "application/json"},
        )[0]
        == 400
    )
    assert (
        app_server.request(
            "POST",
            "/api/generate",
            b'{"prompt": "x"}',
            headers={"Content-Type": "text/plain"},
        )[0]
        == 415
    )
    status, body, _ = app_server.request(
        "POST",
        "/api/upload",
        b"x" * 10,
        headers={"Content-Type": "application/octet-stream", "Content-Length": "60000"},
        send_body=False,
    )
    assert status == 413 and body["field"] == "upload" and "0.05 MB" in body["error"]
    status, body, _ = app_server.request(
        "POST",
        "/api/generate",
        b"{}",
        headers={"Content-Type": "application/json", "Content-Length": "2000000"},
        send_body=False,
    )
    assert (status, body["field"]) == (413, None), body  # not the upload's limit
    assert body["error"] == "The request is larger than the limit of 1 MB."
    garbage = (audio_files / "broken.wav").read_bytes()
    status, body, _ = app_server.request(
        "POST",
        "/api/upload",
        garbage,
        headers={
            "Content-Type": "application/octet-stream",
            "X-Filename": "broken.wav",
        },
    )
    cli = subprocess.run(
        [
            sys.executable,
            str(HERE / "txt2audio.py"),
            "x",
            "--model",
            str(small_converted),
            "--init-audio",
            "broken.wav",
        ],
        cwd=audio_files,
        capture_output=True,
        text=True,
    )
    assert status == 400 and body["field"] == "upload" and "Traceback" not in cli.stderr
    # the same words as the command line, which reads the file before the model
    assert cli.stderr.strip() == f"error: {body['error']}"
    assert app_server.alive()


def test_app_audio_to_audio_from_uploads(
    app_server, small_converted, audio_files, tmp_path
):
    """An uploaded file is varied, inpainted and continued as txt2audio does it."""
    status, upload, _ = app_server.request(
        "POST",
        "/api/upload",
        (audio_files / "stereo.flac").read_bytes(),
        headers={
            "Content-Type": "application/octet-stream",
            "X-Filename": "stereo.flac",
        },
    )
    assert (
        status == 200
        and upload["sample_rate"] == 44100
        and upload["channels"] == 2
        and upload["name"] == "stereo.flac"
    )
    cases = [
        (
            dict(mode="inpaint", inpaint_ranges="0:0.002, 0.008:0.01"),
            [
                "--inpaint-audio",
                str(audio_files / "stereo.flac"),
                "--inpaint-range",
                "0:0.002",
                "--inpaint-range",
                "0.008:0.01",
            ],
        ),
        (
            dict(mode="variation", init_noise_level="3"),
            [
                "--init-audio",
                str(audio_files / "stereo.flac"),
                "--init-noise-level",
                "3",
            ],
        ),
        (
            dict(mode="continue", seconds_total="0.03"),
            ["--continue", str(audio_files / "stereo.flac"), "--seconds-total", "0.03"],
        ),
    ]
    for form, cli in cases:
        job = app_server.wait(
            app_server.generate(steps="3", seed="2", upload=upload["id"], **form)["id"]
        )
        assert job["state"] == "done", job["error"]
        out = tmp_path / "cli.wav"
        result = _txt2audio(
            "warm pads",
            "--model",
            str(small_converted),
            "--steps",
            "3",
            "--seed",
            "2",
            "--output",
            str(out),
            *cli,
        )
        assert result.returncode == 0, result.stderr
        assert (
            app_server.output_dir / job["results"][0]["name"]
        ).read_bytes() == out.read_bytes(), form
    status, body, _ = app_server.request(
        "POST",
        "/api/generate",
        {
            "prompt": "x",
            "mode": "inpaint",
            "upload": upload["id"],
            "inpaint_ranges": "2:1",
        },
    )
    assert status == 400 and body["field"] == "inpaint_ranges"


def _browser():
    """Headless Chromium under ChromeDriver (Debian's chromium and chromium-driver)."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = next(
        filter(
            None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
        ),
        None,
    )
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        if os.environ.get("CI"):
            pytest.fail(
                "CI needs Chromium and ChromeDriver: apt-get install -y chromium"
                " chromium-driver"
            )
        pytest.skip(
            "no Chromium and ChromeDriver here (Debian: apt-get install chromium"
            " chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1100,1620",  # the newest result whole, with its spectrogram
        "--autoplay-policy=no-user-gesture-required",
        "--mute-audio",
    ):
        options.add_argument(argument)
    # without the tests' OpenBLAS preload, which makes Chromium's GPU process give up
    environment = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return webdriver.Chrome(service=Service(driver, env=environment), options=options)


def test_app_in_a_real_browser(app_server, small_converted, audio_files, tmp_path):
    """Chromium opens the page, types a prompt, clicks Generate, watches the progress bar
    fill, and plays the result: an audio element of the requested length, whose file is a
    44.1 kHz stereo wav, its spectrogram beside it with its axes, the header naming the
    model by its folder's name. Then "use this seed" fills the seed; a file is uploaded,
    a range drawn on its waveform, and it is inpainted as txt2audio does it; and a bad
    value shows the command line's message beside its field, writing nothing. The
    screenshot is the README's picture (APP_SCREENSHOT=web/screenshot.png writes it
    there)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from stable_audio import spectrogram

    browser = _browser()
    try:
        wait = WebDriverWait(browser, 120, poll_frequency=0.02)
        browser.get(app_server.url)
        wait.until(
            lambda b: b.execute_script("return document.body.dataset.ready === 'true'")
        )
        assert (
            browser.find_element(By.ID, "sampler").get_attribute("value") == ""
        )  # the model's default
        before = len(browser.find_elements(By.CSS_SELECTOR, ".result"))
        browser.find_element(By.ID, "prompt").send_keys("warm analog pads, slow attack")
        for name, value in (("seconds_total", "0.01"), ("steps", "300"), ("seed", "7")):
            browser.find_element(By.ID, name).send_keys(value)
        browser.find_element(By.ID, "generate").click()
        job_id = (
            wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".job"))
            .get_attribute("id")
            .removeprefix("job-")
        )
        seen = []

        def bar(
            b,
        ):  # what the progress bar shows, until the generation leaves the queue
            shown = b.execute_script(
                "const p = document.querySelector('.job progress'); return p ?"
                " [p.value, p.max] : null"
            )
            return shown is None or seen.append(tuple(shown))

        wait.until(bar)
        steps = [value for value, total in seen if total == 300]
        assert len(set(steps)) >= 2 and steps == sorted(
            steps
        ), seen  # it moved forward with the steps
        assert app_server.request("GET", f"/api/jobs/{job_id}")[1]["step"] == 300
        wait.until(
            lambda b: len(b.find_elements(By.CSS_SELECTOR, ".result")) == before + 1
        )
        played = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const audio = document.querySelector('.result audio');
            fetch(audio.src).then(r => r.arrayBuffer()).then(bytes => {
                const header = new DataView(bytes);
                const report = () => done({duration: audio.duration, ended: audio.ended, currentTime: audio.currentTime,
                    rate: header.getUint32(24, true), channels: header.getUint16(22, true), src: audio.src});
                audio.addEventListener('ended', report);
                audio.play().catch(error => done({error: String(error)}));
            });""")
        assert "error" not in played, played
        assert played["ended"] and played["duration"] == pytest.approx(
            441 / 44100, abs=1e-4
        ), played
        assert (played["rate"], played["channels"]) == (44100, 2)
        name = played["src"].rsplit("/", 1)[1]
        assert (
            (app_server.output_dir / name).is_file()
            and name.endswith(".wav")
            and "seed7" in name
        )
        browser.find_element(By.ID, "seed").clear()
        browser.find_element(By.CSS_SELECTOR, ".result .use-seed").click()
        assert browser.find_element(By.ID, "seed").get_attribute("value") == "7"
        images = browser.execute_script(
            "return [...document.querySelectorAll('.result img')].map(i =>"
            " [i.complete, i.naturalWidth])"
        )
        width = spectrogram.LEFT + spectrogram.WIDTH + spectrogram.RIGHT
        assert images and images[0] == [True, width]  # the spectrogram, with axes
        header = browser.find_element(By.ID, "model").text
        assert header.startswith("mlx_model · 44100 Hz") and "/" not in header, header
        assert "results in outputs" in header  # the folder as given

        # inpainting an uploaded file, its range drawn on the waveform: txt2audio's file
        Select(browser.find_element(By.ID, "mode")).select_by_value("inpaint")
        browser.find_element(By.ID, "upload").send_keys(
            str(audio_files / "stereo.flac")
        )
        wait.until(lambda b: "44100 Hz" in b.find_element(By.ID, "upload-info").text)
        canvas = browser.find_element(By.ID, "waveform")
        wait.until(
            lambda b: b.execute_script(
                "const c = arguments[0]; return c.getContext('2d').getImageData(0, 0,"
                " c.width, c.height).data.some(v => v)",
                canvas,
            )
        )
        width = canvas.size["width"]
        ActionChains(browser).move_to_element_with_offset(
            canvas, -width // 4, 0
        ).click_and_hold().move_by_offset(width // 8, 0).release().perform()
        ranges = browser.find_element(By.ID, "inpaint_ranges").get_attribute("value")
        start, end = (float(t) for t in ranges.split(":"))
        window = 512 / 44100  # the file is longer: the canvas spans the window
        assert start == pytest.approx(
            window / 4, abs=window / 50
        ) and end == pytest.approx(window * 3 / 8, abs=window / 50), ranges
        for name, value in (("steps", "3"), ("seed", "2")):
            browser.find_element(By.ID, name).clear()
            browser.find_element(By.ID, name).send_keys(value)
        browser.find_element(By.ID, "generate").click()
        wait.until(
            lambda b: len(b.find_elements(By.CSS_SELECTOR, ".result")) == before + 2
        )
        newest = browser.find_element(By.CSS_SELECTOR, ".result").get_attribute(
            "data-name"
        )
        out = tmp_path / "inpainted.wav"
        cli = _txt2audio(
            "warm analog pads, slow attack",
            "--model",
            str(small_converted),
            "--steps",
            "3",
            "--seed",
            "2",
            "--seconds-total",
            "0.01",
            "--inpaint-audio",
            str(audio_files / "stereo.flac"),
            "--inpaint-range",
            ranges,
            "--output",
            str(out),
        )
        assert cli.returncode == 0, cli.stderr
        assert (app_server.output_dir / newest).read_bytes() == out.read_bytes()
        screenshot = Path(os.environ.get("APP_SCREENSHOT") or tmp_path / "app.png")
        browser.save_screenshot(str(screenshot))
        assert screenshot.read_bytes()[:4] == b"\x89PNG"

        before = _files(app_server.output_dir)
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("0")
        browser.find_element(By.ID, "generate").click()
        message = wait.until(lambda b: b.find_element(By.ID, "error-steps").text)
        cli = _txt2audio(
            "warm pads",
            "--model",
            str(small_converted),
            "--steps",
            "0",
            "--output",
            str(tmp_path / "x.wav"),
        )
        assert cli.stderr.strip() == f"error: {message}"
        assert "invalid" in steps.get_attribute("class") and not browser.find_elements(
            By.CSS_SELECTOR, ".job"
        )
        assert _files(app_server.output_dir) == before
    finally:
        browser.quit()


def _unwritable(tmp_path: Path) -> Path:
    """A folder no file can be made in: a read-only one, or (for root, who writes
    there too) /sys; the test is skipped where neither is."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / "probe").touch()
            (candidate / "probe").unlink()
        except OSError:
            return candidate
    pytest.skip("no folder here refuses to be written to")


def test_app_refuses_bad_command_lines(small_converted, tmp_path):
    """app.py's own bad input: one line, before anything is loaded or served (an output
    folder it could not write to included)."""
    busy = AppServer(small_converted, tmp_path / "out")
    try:
        for args, message in [
            (["--port", str(busy.port)], "Cannot listen on 127.0.0.1"),
            (["--port", "70000"], "--port must be in"),
            (["--output-dir", str(HERE / "app.py")], "is a file"),
            (["--dtype", "float8"], "Unknown dtype"),
            (["--lora", str(tmp_path / "none.safetensors")], "does not exist"),
            (["--max-upload-mb", "0"], "--max-upload-mb must be"),
            (["--max-upload-mb", "inf"], "--max-upload-mb: expected a finite number"),
            (
                ["--output-dir", str(_unwritable(tmp_path))],
                "Cannot write to --output-dir",
            ),
        ]:
            argv = [
                sys.executable,
                str(HERE / "app.py"),
                "--model",
                str(small_converted),
                "--port",
                "0",
                *args,
            ]
            result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            assert result.returncode != 0 and "Traceback" not in result.stderr
            assert message in result.stderr.strip().splitlines()[-1], result.stderr
    finally:
        log = busy.stop()
    assert busy.process.returncode == 0 and "Stopped." in log


# ------------------------------------------------ nothing lost, spliced or stranded


def _upload(server, data: bytes, name: str):
    return server.request(
        "POST",
        "/api/upload",
        data,
        headers={"Content-Type": "application/octet-stream", "X-Filename": name},
    )


def _wav(rate: int, samples, subtype="PCM_16") -> bytes:
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def _whole_results(folder: Path) -> list:
    """The stems of the results in `folder`, each checked whole: a readable audio file
    beside its spectrogram and its settings, and no temporary file left."""
    import soundfile as sf

    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.startswith(".") or "partial" in n], names
    stems = {Path(n).stem for n in names}
    for stem in stems:
        assert {f"{stem}.wav", f"{stem}.svg", f"{stem}.json"} <= set(names), names
        assert len(sf.read(folder / f"{stem}.wav")[0]) > 0
        assert (
            json.loads((folder / f"{stem}.json").read_text())["file"] == f"{stem}.wav"
        )
    assert len(names) == 3 * len(stems), names
    return sorted(stems)


def test_app_writes_settings_under_a_name_of_their_own(small_converted, tmp_path):
    """A result's settings are written under a temporary name no other writer uses (a
    fixed one, here taken by folders, would fail the generation), then renamed."""
    server = AppServer(small_converted, tmp_path / "out")
    try:
        now = time.time()
        taken = [  # each name a fixed `.STEM.json.partial` would take in a minute
            tmp_path / "out" / f".{time.strftime('%Y%m%d-%H%M%S', time.localtime(t))}"
            f"-seed9.json.partial"
            for t in range(int(now), int(now) + 60)
        ]
        for folder in taken:
            folder.mkdir()
        job = server.wait(
            server.generate(seconds_total="0.01", steps="1", seed="9")["id"]
        )
        assert job["state"] == "done", job["error"]
        for folder in taken:
            folder.rmdir()
        assert _whole_results(server.output_dir) == [
            Path(job["results"][0]["name"]).stem
        ]
    finally:
        log = server.stop()
    assert "Traceback" not in log, log


def test_app_refuses_non_finite_numbers(app_server, audio_files):
    """Every number of the API, as text ("inf", "nan", "1e400"...), as JSON's Infinity
    and NaN, or as a JSON number too large for a float, is a 400 naming its field."""
    status, upload, _ = _upload(
        app_server, (audio_files / "stereo.flac").read_bytes(), "stereo.flac"
    )
    assert status == 200, upload
    texts = ['"inf"', '"-inf"', '"nan"', '"NaN"', '"1e400"', '"-1e400"']
    constants = ["Infinity", "-Infinity", "NaN", "1e400", "-1e400"]
    forms = {
        name: '{"prompt": "x", "seconds_total": "0.01", "%s": %%s}' % name
        for name in (
            "seconds_total",
            "steps",
            "cfg_scale",
            "seed",
            "batch_size",
            "overlap",
            "bpm",
            "bars",
            "beats_per_bar",
        )
    }
    forms["init_noise_level"] = (
        '{"prompt": "x", "mode": "variation", "upload": "%s", "init_noise_level": %%s}'
        % upload["id"]
    )
    forms["inpaint_ranges"] = (
        '{"prompt": "x", "mode": "inpaint", "upload": "%s", "inpaint_ranges": %%s}'
        % upload["id"]
    )
    before = _files(app_server.output_dir)
    for name, form in forms.items():
        values = texts + constants
        if name == "inpaint_ranges":  # START:END, either one not finite
            values = (
                constants
                + [f'"0:{t[1:]}' for t in texts]
                + [f'{t[:-1]}:0"' for t in texts]
            )
        for value in values:
            body = form % value
            status, answer, _ = app_server.request(
                "POST", "/api/generate", body, {"Content-Type": "application/json"}
            )
            assert status == 400 and answer["field"] == name, (body, answer)
            assert "\n" not in answer["error"]
    assert _files(app_server.output_dir) == before and app_server.alive()


def test_app_reads_uploads_before_queueing(small_converted, audio_files, tmp_path):
    """The settings are checked with the upload's audio read: a continuation not longer
    than its file is refused before it is queued; a queued job holds what it read (the
    upload's file may go), so the worker reads nothing again."""
    uploads = tmp_path / "tmp"
    uploads.mkdir()
    server = AppServer(
        small_converted, tmp_path / "out", env={**os.environ, "TMPDIR": str(uploads)}
    )
    try:
        status, upload, _ = _upload(
            server, (audio_files / "stereo.flac").read_bytes(), "stereo.flac"
        )
        assert status == 200 and upload["seconds"] == pytest.approx(600 / 44100)
        status, body, _ = server.request(
            "POST",
            "/api/generate",
            {
                "prompt": "x",
                "mode": "continue",
                "upload": upload["id"],
                "seconds_total": "0.01",
            },
        )
        assert status == 400 and body["field"] == "seconds_total", body
        assert "longer than the audio it continues" in body["error"]
        long = server.generate(seconds_total="0.01", steps="10000", seed="1")
        server.wait(long["id"], until=lambda j: j["state"] == "running")
        varied = server.generate(
            mode="variation",
            upload=upload["id"],
            steps="2",
            seed="2",
            seconds_total="0.01",
        )
        assert varied["state"] == "queued"
        for file in uploads.glob("stable-audio-uploads-*/*"):
            file.unlink()  # the queued job already holds its audio
        server.request("POST", f"/api/jobs/{long['id']}/cancel")
        job = server.wait(varied["id"])
        assert job["state"] == "done", job["error"]
    finally:
        log = server.stop()
    assert "Traceback" not in log, log


def _peak_memory(pid: int) -> int:
    """A process's peak resident memory in bytes (Linux's VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) * 1024


@pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="needs Linux's /proc"
)
def test_app_describes_an_upload_without_decoding_it(small_converted, tmp_path):
    """An hour of silence (90 KB of FLAC, 115 MB of samples) is described by its header
    and decoded no further than the model could use (its longest seconds_total)."""
    import numpy as np
    import soundfile as sf

    silence = tmp_path / "an hour.flac"
    with sf.SoundFile(silence, "w", 8000, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(60):
            f.write(np.zeros(8000 * 60, np.float32))
    server = AppServer(small_converted, tmp_path / "out", "--max-upload-mb", "1")
    try:
        before = _peak_memory(server.process.pid)
        status, upload, _ = _upload(server, silence.read_bytes(), silence.name)
        grown = _peak_memory(server.process.pid) - before
        assert status == 200 and upload["seconds"] == 3600, upload
        longest = server.request("GET", "/api/info")[1]["longest"]
        # at most the longest length and a second, as float32 samples, with one copy
        assert grown < 2 * 4 * 8000 * (longest + 1) + (20 << 20), grown
    finally:
        log = server.stop()
    assert "Traceback" not in log, log


def test_app_refuses_uploads_the_model_cannot_use(app_server):
    """An upload with NaN or infinite samples, or at a rate the model could not resample
    (44101 Hz to 44100 Hz: too fine a ratio), is refused when it is uploaded, with
    one line naming the file."""
    import numpy as np

    noisy = np.zeros((100, 2), np.float32)
    noisy[50, 1] = np.nan
    for data, name, words in [
        (
            _wav(44100, noisy, "FLOAT"),
            "nan.wav",
            "'nan.wav' holds NaN or infinite samples.",
        ),
        (_wav(44100, noisy * 0 + np.inf, "FLOAT"), "inf.wav", "holds NaN or infinite"),
        (
            _wav(44101, np.zeros((100, 2), np.float32)),
            "odd rate.wav",
            "Cannot resample 44101 Hz to 44100 Hz (their ratio is too fine);",
        ),
    ]:
        status, body, _ = _upload(app_server, data, name)
        assert status == 400 and body["field"] == "upload", body
        assert words in body["error"] and "\n" not in body["error"], body
    ok = _wav(48000, np.zeros((100, 2), np.float32))
    assert _upload(app_server, ok, "fine.wav")[0] == 200
    assert app_server.alive()


def test_app_answers_odd_requests_without_failing(app_server):
    """JSON nested too deeply is a 400; a Range of thousands of digits (more than
    Python's int() takes) is clamped to the file: past its end a 416, as HTTP says."""
    status, body, _ = app_server.request(
        "POST", "/api/generate", "[" * 100000, {"Content-Type": "application/json"}
    )
    assert status == 400 and "too deep" in body["error"], body
    job = app_server.wait(app_server.generate(seconds_total="0.01", steps="1")["id"])
    url = job["results"][0]["audio"]
    whole = app_server.request("GET", url)[1]
    huge = "9" * 5000
    for header, status, part in [
        (f"bytes={huge}-", 416, b""),
        (f"bytes={len(whole)}-", 416, b""),
        (f"bytes=0-{huge}", 206, whole),
        (f"bytes=-{huge}", 206, whole),
        (f"bytes={'0' * 5000}1-", 206, whole[1:]),
        ("bytes=-4", 206, whole[-4:]),
        ("bytes=x-y", 200, whole),
    ]:
        answer = app_server.request("GET", url, headers={"Range": header})
        assert (answer[0], answer[1]) == (status, part), header[:20]
        if status == 416:
            assert answer[2].getheader("Content-Range") == f"bytes */{len(whole)}"
    assert app_server.alive()


def _raw(server, data: bytes, then: str) -> bytes:
    """Send `data` on a connection of its own, then "reset" it (RST: the server's reads
    and writes fail) or "half-close" it (the server reads to the end) and read the
    answer."""
    import socket
    import struct

    with socket.create_connection((server.host, server.port), timeout=30) as s:
        s.sendall(data)
        if then == "reset":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return b""
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


def test_app_takes_lying_clients_quietly(small_converted, tmp_path):
    """A body shorter than its Content-Length is never acted on (a 400 if the client
    still listens), and clients that leave mid-request or mid-answer leave no traceback
    in the server's log."""
    server = AppServer(small_converted, tmp_path / "out")
    try:
        job = server.wait(server.generate(seconds_total="0.01", steps="1")["id"])
        form = b'{"prompt": "x", "seconds_total": "0.01", "steps": "1"}'
        head = b"POST /api/generate HTTP/1.1\r\nHost: %s:%d\r\n" % (
            server.address.encode(),
            server.port,
        )
        lying = head + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        answer = _raw(server, lying + form, "half-close")
        assert answer.startswith(b"HTTP/1.0 400") and b"ended before" in answer, answer
        upload = lying.replace(b"generate", b"upload").replace(
            b"application/json", b"application/octet-stream"
        )
        get = b"GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (
            job["results"][0]["spectrogram"].encode(),
            server.address.encode(),
            server.port,
        )
        for _ in range(3):
            for data in (lying + form, upload + b"RIFF", get, get[:10], head):
                _raw(server, data, "reset")
        time.sleep(0.5)
        assert server.alive() and len(server.request("GET", "/api/history")[1]) == 1
    finally:
        log = server.stop()
    assert "Traceback" not in log and "Exception" not in log, log


def _ipv6_loopback() -> bool:
    import socket

    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(
    not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)"
)
def test_app_serves_ipv6(small_converted, tmp_path):
    """--host ::1 serves on IPv6's loopback, answering requests addressed to [::1]."""
    server = AppServer(small_converted, tmp_path / "out", host="::1")
    try:
        assert server.url == f"http://[::1]:{server.port}"
        assert server.request("GET", "/")[0] == 200
        assert (
            server.request("GET", "/", headers={"Host": "attacker.example"})[0] == 400
        )
    finally:
        log = server.stop()
    assert server.process.returncode == 0 and "Traceback" not in log, log


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_app_stops_on_signals(small_converted, audio_files, tmp_path, signum):
    """Ctrl-C, SIGTERM and a closed terminal (SIGHUP) all stop the server cleanly,
    removing the folder of its uploads."""
    import signal

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**os.environ, "TMPDIR": str(temporary)}
    server = AppServer(small_converted, tmp_path / "out", env=env)
    try:
        sent = _upload(server, (audio_files / "stereo.flac").read_bytes(), "a.flac")
        kept = list(temporary.glob("stable-audio-uploads-*/*.flac"))
    finally:
        log = server.stop(getattr(signal, signum))
    assert sent[0] == 200 and kept, sent
    assert server.process.returncode == 0 and "Stopped." in log, log
    assert "Traceback" not in log and not list(temporary.iterdir()), log


def test_app_interrupted_leaves_only_whole_results(small_converted, tmp_path):
    """Ctrl-C while a job's results are being written lets them all be written whole
    (audio, spectrogram and settings; no temporary file); Ctrl-C while sampling stops
    the generation at its next step, writing nothing."""
    import signal

    server = AppServer(small_converted, tmp_path / "out")
    try:
        job = server.generate(seconds_total="0.01", steps="1", batch_size="24")
        while not [p for p in server.output_dir.glob("*.wav") if p.name[0] != "."]:
            state = server.request("GET", f"/api/jobs/{job['id']}")[1]["state"]
            assert state in ("queued", "running", "done"), state
            time.sleep(0.001)
    finally:
        log = server.stop(signal.SIGINT)
    assert server.process.returncode == 0 and "Traceback" not in log, log
    assert len(_whole_results(server.output_dir)) == 24

    server = AppServer(small_converted, tmp_path / "later")
    try:
        job = server.generate(seconds_total="0.01", steps="10000", batch_size="3")
        server.wait(job["id"], until=lambda j: j["step"] > 0)
    finally:
        started = time.monotonic()
        log = server.stop(signal.SIGINT)
    assert server.process.returncode == 0 and "Traceback" not in log, log
    assert time.monotonic() - started < 10 and not list(server.output_dir.iterdir())


SIMULATED_FULL_DISK = """
import shutil, soundfile
usage = shutil.disk_usage
shutil.disk_usage = lambda path: usage(path)._replace(free=4096)
def write(*args, **kwargs):
    raise RuntimeError("Error : System error.")
soundfile.write = write
"""


def test_app_names_a_full_disk(small_converted, tmp_path):
    """A result that cannot be written for want of space fails its generation with the
    file named and the reason (it was "MLX failed (System error.) ..."), leaving no
    temporary file; where no tmpfs can be mounted, libsndfile's failure on a full disk
    is simulated in the server's process."""
    env = None
    with full_disk(tmp_path) as disk:
        if disk is None:
            disk = tmp_path / "disk"
            (tmp_path / "site").mkdir()
            (tmp_path / "site" / "sitecustomize.py").write_text(SIMULATED_FULL_DISK)
            env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
        server = AppServer(small_converted, disk / "results", env=env)
        try:
            before = sorted(p.name for p in (disk / "results").iterdir())
            job = server.wait(server.generate(seconds_total=0.01, steps=1)["id"])
            assert job["state"] == "failed", job
            assert re.fullmatch(
                f"Cannot write {re.escape(str(disk))}/results/\\S+\\.wav: the disk is"
                " full. Free some space and retry.",
                job["error"],
            ), job["error"]
            assert sorted(p.name for p in (disk / "results").iterdir()) == before
        finally:
            log = server.stop()
        assert server.process.returncode == 0 and "Traceback" not in log, log
