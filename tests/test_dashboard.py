"""The dashboard in a real browser (headless Chromium from Debian, driven by Selenium with chromium-driver), against
a real server running real calls; /metrics parsed by prometheus_client's OpenMetrics parser; /healthz and /readyz.

Screenshots of each page go to test-artifacts/dashboard/ (or $FAL_TEST_ARTIFACTS/dashboard)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, Tuple

import httpx
import pytest
from conftest import ROOT, Server, cloud_call, run_script, start_client, start_server
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

ARTIFACTS = Path(os.environ.get("FAL_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "dashboard"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

#: A log line a user's code prints: the page must show it as text.
HOSTILE = "<script>document.title='owned'</script><b>bold</b>"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    started = start_server()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def keys(server: Server) -> Dict[str, Tuple[str, str]]:
    return {"alice": server.create_key("alice"), "bob": server.create_key("bob")}


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("the dashboard tests need chromium and chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def url(server: Server, path: str) -> str:
    return f"http://{server.host}{path}"


def screenshot(browser: WebDriver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def click(browser: WebDriver, by: str, value: str) -> None:
    """Clicks what submits a form or follows a link, and waits for the next page to have replaced this one.

    The old page is marked with a window property (a new document has none) rather than watched through an element
    reference: while a page is being replaced, Chromium can answer a question about an old element with a generic
    inspector error ("Node with given id does not belong to the document") instead of a stale-element one."""
    browser.execute_script("window.falPageBeforeClick = true")
    browser.find_element(by, value).click()
    WebDriverWait(browser, 30, ignored_exceptions=(WebDriverException,)).until(
        lambda b: b.execute_script(
            "return window.falPageBeforeClick === undefined && document.readyState === 'complete'"
        )
    )


def sign_in(browser: WebDriver, server: Server, key: Tuple[str, str]) -> None:
    browser.get(url(server, "/login"))
    browser.find_element(By.ID, "key").send_keys(f"{key[0]}:{key[1]}")
    click(browser, By.ID, "sign-in")
    assert browser.current_url.endswith("/workers"), browser.page_source


def eventually(check: Callable[[], bool], timeout: float, what: str, browser: WebDriver, reload: bool = True) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except WebDriverException:  # the element not there yet, or the page being replaced under it
            pass
        time.sleep(0.5)
        if reload:
            browser.refresh()
    raise AssertionError(f"{what} did not happen within {timeout}s; the page: {browser.page_source[:3000]}")


def worker_states(browser: WebDriver) -> Dict[str, str]:
    rows = browser.find_elements(By.CSS_SELECTOR, "#workers tr.worker")
    return {row.get_attribute("data-pid") or "": row.find_element(By.CLASS_NAME, "state").text for row in rows}


def test_a_wrong_key_cannot_sign_in_and_the_session_cookie_is_http_only(
    server: Server, keys: Dict[str, Tuple[str, str]], browser: WebDriver
) -> None:
    key_id, secret = keys["alice"]
    browser.get(url(server, "/workers"))
    assert browser.current_url.endswith("/login")
    browser.find_element(By.ID, "key").send_keys(f"{key_id}:not-the-secret")
    click(browser, By.ID, "sign-in")
    assert "not valid" in browser.find_element(By.ID, "error").text
    assert browser.get_cookies() == []
    screenshot(browser, "01-wrong-key")
    browser.get(url(server, "/runs"))
    assert browser.current_url.endswith("/login")
    sign_in(browser, server, keys["alice"])
    (cookie,) = browser.get_cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert secret not in browser.current_url and secret not in cookie["value"]
    # A worker's key (what a function's calls use) cannot sign in.
    worker_key = run_script(
        "from fal_serverless import isolated, cloud\n"
        "@isolated(host=cloud)\n"
        "def f():\n"
        "    import os\n"
        "    return os.environ['FAL_KEY_ID'] + ':' + os.environ['FAL_KEY_SECRET']\n"
        "print(f())\n",
        server.env(*keys["bob"]),
    )
    assert worker_key.returncode == 0, worker_key.stderr
    refused = httpx.post(url(server, "/login"), data={"key": worker_key.stdout.strip()})
    assert refused.status_code == 401 and "cannot sign in" in refused.text and "set-cookie" not in refused.headers
    # A script of the page cannot read it.
    assert browser.execute_script("return document.cookie") == ""
    # A POST without the session's CSRF token changes nothing.
    session = httpx.Client(cookies={cookie["name"]: cookie["value"]})
    answer = session.post(url(server, "/keys"), data={"csrf": "forged", "alias": "x"})
    assert answer.status_code == 403 and "out of date" in answer.text


def test_a_busy_worker_appears_its_live_log_arrives_as_text_then_it_goes_idle_and_is_stopped(
    server: Server, keys: Dict[str, Tuple[str, str]], browser: WebDriver
) -> None:
    sign_in(browser, server, keys["alice"])
    client = start_client(
        server,
        keys["alice"],
        f"""
import time
print({HOSTILE!r}, flush=True)
time.sleep(6)
print("second line", flush=True)
time.sleep(3)
print("third line", flush=True)
return 'done'
""",
        keep_alive=120,
    )
    try:
        eventually(lambda: "busy" in worker_states(browser).values(), 120, "a busy worker listed", browser)
        screenshot(browser, "02-workers-busy")
        browser.get(url(server, "/runs?outcome=running"))
        click(browser, By.CSS_SELECTOR, "#runs tr.run a")
        assert browser.find_element(By.ID, "outcome").text == "running"
        eventually(
            lambda: "third line" in browser.find_element(By.ID, "logs").text,
            60,
            "the live log's last line",
            browser,
            reload=False,
        )
        messages = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#logs td.message")]
        assert HOSTILE in messages and "second line" in messages, messages
        assert browser.title != "owned" and not browser.find_elements(By.CSS_SELECTOR, "#logs b")
        eventually(
            lambda: browser.find_element(By.ID, "outcome").text == "success", 30, "the run's end", browser, False
        )
        screenshot(browser, "03-run-live-log")
        stdout, stderr = client.communicate(timeout=60)
        assert client.returncode == 0 and "'done'" in stdout, stderr
    finally:
        if client.poll() is None:
            client.kill()
    # Ended, the run's page shows its stored logs, escaped the same.
    browser.refresh()
    assert HOSTILE in [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#logs td.message")]
    browser.get(url(server, "/workers"))
    eventually(lambda: list(worker_states(browser).values()) == ["idle"], 30, "the worker idle", browser)
    (pid,) = worker_states(browser)
    screenshot(browser, "04-workers-idle")
    click(browser, By.CSS_SELECTOR, f"tr[data-pid='{pid}'] button.stop")
    assert f"worker {pid} stopped" in browser.find_element(By.ID, "notice").text
    assert worker_states(browser) == {}
    assert not [w for w in server.workers() if w["user"] == "alice"]
    screenshot(browser, "05-worker-stopped")


def test_a_user_sees_only_their_own_workers_runs_and_apps(
    server: Server, keys: Dict[str, Tuple[str, str]], browser: WebDriver
) -> None:
    done = cloud_call(server, "return 'alice was here'", keys["alice"], keep_alive=60)
    assert done.returncode == 0, done.stderr
    sign_in(browser, server, keys["alice"])
    browser.get(url(server, "/runs"))
    alice_run = browser.find_element(By.CSS_SELECTOR, "#runs tr.run a").get_attribute("href")
    assert alice_run
    browser.delete_all_cookies()
    sign_in(browser, server, keys["bob"])
    assert worker_states(browser) == {}
    for page in ("/runs", "/apps", "/environments", "/keys", "/secrets", "/schedules"):
        browser.get(url(server, page))
        assert "alice" not in browser.find_element(By.TAG_NAME, "main").text, page
        screenshot(browser, f"06-bob{page.replace('/', '-')}")
    browser.get(alice_run)
    assert "no run" in browser.find_element(By.ID, "error").text
    # The admin sees alice's.
    browser.delete_all_cookies()
    sign_in(browser, server, (server.admin_id, server.admin_secret))
    assert "alice" in browser.find_element(By.ID, "workers").text
    browser.get(url(server, "/runs?user=alice"))
    assert "alice" in browser.find_element(By.ID, "runs").text
    screenshot(browser, "07-admin-runs")


def test_a_key_made_in_the_browser_is_shown_once_and_revoked_there(
    server: Server, keys: Dict[str, Tuple[str, str]], browser: WebDriver
) -> None:
    sign_in(browser, server, keys["alice"])
    browser.get(url(server, "/keys"))
    browser.find_element(By.NAME, "alias").send_keys("<i>for ci</i>")
    click(browser, By.ID, "create-key")
    new_id, new_secret = browser.find_element(By.ID, "new-key").text.split(":", 1)
    assert "<i>for ci</i>" in browser.find_element(By.ID, "keys").text
    screenshot(browser, "08-key-created")
    works = cloud_call(server, "return 1", (new_id, new_secret))
    assert works.returncode == 0, works.stderr
    browser.get(url(server, "/keys"))
    assert new_secret not in browser.page_source
    click(browser, By.CSS_SELECTOR, f"tr[data-key='{new_id}'] button.revoke")
    assert new_id not in browser.find_element(By.ID, "keys").text
    screenshot(browser, "09-key-revoked")
    refused = cloud_call(server, "return 1", (new_id, new_secret))
    assert refused.returncode != 0 and "revoked" in refused.stderr.lower() + refused.stdout.lower()
    # A session signed in with a key ends when the key is revoked.
    browser.delete_all_cookies()
    sign_in(browser, server, keys["bob"])
    bob_second = server.create_key("bob")
    browser.delete_all_cookies()
    sign_in(browser, server, bob_second)
    assert server.cli("keys", "revoke", bob_second[0]).returncode == 0
    browser.get(url(server, "/workers"))
    assert browser.current_url.endswith("/login")


def sample(families: Dict[str, list], name: str, **labels: str) -> float:
    for family in families.values():
        for s in family:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


def test_metrics_count_known_calls_and_take_an_admin_key(server: Server, keys: Dict[str, Tuple[str, str]]) -> None:
    metrics = url(server, "/metrics")
    assert httpx.get(metrics).status_code == 401
    alice = f"Key {keys['alice'][0]}:{keys['alice'][1]}"
    assert httpx.get(metrics, headers={"Authorization": alice}).status_code == 403

    def scrape() -> Dict[str, list]:
        admin = f"Key {server.admin_id}:{server.admin_secret}"
        answer = httpx.get(metrics, headers={"Authorization": admin})
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/openmetrics-text")
        return {family.name: family.samples for family in text_string_to_metric_families(answer.text)}

    before = scrape()
    try:
        calls_before = sample(before, "fal_runs_total", kind="call", outcome="success", machine_type="XS")
    except AssertionError:
        calls_before = 0.0
    for n in range(3):
        done = cloud_call(server, f"return {n}", keys["bob"], keep_alive=30)
        assert done.returncode == 0, done.stderr
    failed = cloud_call(server, "raise ValueError('no')", keys["bob"], keep_alive=30)
    assert failed.returncode != 0
    after = scrape()
    assert sample(after, "fal_runs_total", kind="call", outcome="success", machine_type="XS") == calls_before + 3
    assert sample(after, "fal_runs_total", kind="call", outcome="error", machine_type="XS") >= 1
    assert sample(after, "fal_run_duration_seconds_count", kind="call", machine_type="XS") >= calls_before + 4
    assert sample(after, "fal_cold_starts_total", machine_type="XS") >= 1
    assert sample(after, "fal_environment_builds_total", outcome="ok") >= 1
    assert sample(after, "fal_workers", state="idle", machine_type="XS") >= 1
    assert sample(after, "fal_capacity_total", resource="cpus") > 0
    assert sample(after, "fal_queue_depth") == 0


def test_public_metrics_and_the_health_probes() -> None:
    public = start_server(config="[metrics]\npublic = true\n")
    try:
        assert httpx.get(url(public, "/metrics")).status_code == 200
        health = httpx.get(url(public, "/healthz"))
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        ready = httpx.get(url(public, "/readyz"))
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["sqlite"] == "ok" and ready.json()["checks"]["data_dir"] == "ok"
        # A data dir that takes no file makes it not ready, saying why; it is ready again once it does.
        # Its probes go in <data dir>/.readyz/: a file in that place makes the data dir take none.
        shutil.rmtree(public.data_dir / ".readyz")
        (public.data_dir / ".readyz").write_text("in the way")
        unready = httpx.get(url(public, "/readyz"))
        assert unready.status_code == 503 and "data dir" in unready.json()["checks"]["data_dir"], unready.text
        (public.data_dir / ".readyz").unlink()
        assert httpx.get(url(public, "/readyz")).status_code == 200
    finally:
        public.stop()


APP = """
from fal_serverless import isolated

@isolated(serve=True, keep_alive=60, max_concurrency=3)
def greet(name: str) -> dict:
    return {"hello": name}

print(greet.serve(alias="greeter"))
"""


def test_an_app_shows_its_replicas_and_traffic_and_an_environment_is_removed(
    server: Server, browser: WebDriver
) -> None:
    key = server.create_key("carol")
    deployed = run_script(APP, server.env(*key), timeout=600)
    assert deployed.returncode == 0, deployed.stderr
    app_url = deployed.stdout.strip().splitlines()[-1]
    headers = {"Authorization": f"Key {key[0]}:{key[1]}"}
    for name in ("a", "b", "c"):
        answer = httpx.post(app_url, params={"name": name}, headers=headers, timeout=300)
        assert answer.status_code == 200 and answer.json() == {"hello": name}, answer.text
        # On the dashboard's origin, an app's answer is sandboxed: its pages cannot act as a signed-in user there.
        policy = answer.headers["content-security-policy"]
        assert "sandbox" in policy and "allow-same-origin" not in policy, policy
    # An app named by the host keeps every path, the dashboard's too.
    by_host = httpx.post(
        f"http://{server.host}/workers",
        params={"name": "d"},
        headers={**headers, "Host": "carol-greeter.gateway.localhost"},
        timeout=300,
    )
    assert by_host.status_code != 303 and "Workers" not in by_host.text, by_host.text
    admin = {"Authorization": f"Key {server.admin_id}:{server.admin_secret}"}
    scraped = httpx.get(url(server, "/metrics"), headers=admin).text
    families = {family.name: family.samples for family in text_string_to_metric_families(scraped)}
    assert sample(families, "fal_runs_total", kind="web", outcome="success", machine_type="XS") >= 3
    assert sample(families, "fal_app_replicas", user="carol", app="greeter") == 1

    sign_in(browser, server, key)
    browser.get(url(server, "/apps"))
    (row,) = browser.find_elements(By.CSS_SELECTOR, "#apps tr.app")
    cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "carol" and cells[1] == "greeter" and cells[4] == "private", cells
    assert cells[6] == "1 / 3", cells
    assert float(cells[10].removesuffix("/s")) > 0, cells
    screenshot(browser, "10-apps")

    done = cloud_call(server, "return 'env'", key, keep_alive=0, requirements=["six==1.16.0"])
    assert done.returncode == 0, done.stderr
    browser.get(url(server, "/environments"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#environments tr")
    with_six = [r for r in rows if "six==1.16.0" in r.text]
    assert len(with_six) == 1, [r.text for r in rows]
    screenshot(browser, "11-environments")
    environment = with_six[0].find_elements(By.TAG_NAME, "td")[1].text
    remove = f"form[action='/environments/carol/{environment}/remove'] button"
    # Its worker (keep_alive 0) is stopped just after the call: then it is no longer in use, and can be removed.
    eventually(lambda: bool(browser.find_elements(By.CSS_SELECTOR, remove)), 30, "the environment free", browser)
    click(browser, By.CSS_SELECTOR, remove)
    assert f"removed carol/{environment}" in browser.find_element(By.ID, "notice").text
    assert environment not in browser.find_element(By.ID, "environments").text
