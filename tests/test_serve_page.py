"""The chat page (ziya_jax/serve/page.py) in a real browser: Debian's Chromium, headless, driven by Selenium, on
`python -m ziya_jax.serve` in a subprocess. What the page shows is checked against the server's own API for the
same conversation: the independent check that the page puts the conversation and its images to the engine as the
API does. On conftest's tiny_chat model, whose 128-token context a first answer fills, so that a second question
is refused (the page's error path) until the conversation is cleared; the placement of images in a conversation
that goes on is checked without a browser, against the API's own conversion."""

import base64
import json
import shutil
import urllib.error
import urllib.request

import pytest
from clis import Server
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.slow  # not in the fast lane (pytest -m "not slow")

KEY = "page-key-0123"
WAIT = 120  # seconds any one step may take on a slow 2-core machine
EN, ZH = "Describe the image briefly.", "请简要描述这张图片。"


@pytest.fixture(scope="module")
def server(tiny_chat, tmp_path_factory):
    """The server's URL, with the page (and an API key), up once /health answers; SIGTERM at the end."""
    folder = tmp_path_factory.mktemp("page")
    (folder / "key").write_text(KEY)
    with Server(tiny_chat[0] / "ckpt", "--api-key-file", str(folder / "key")) as s:
        yield s.url


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = f"--user-data-dir={tmp_path / 'chromium'}"  # its profile and sockets stay in the test's folder
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000", profile):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def api(server, messages) -> tuple[int, dict]:
    """POST /v1/chat/completions greedily, with no max_tokens (as the page asks) -> (status, JSON body)."""
    body = json.dumps({"model": "ckpt", "messages": messages, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    request = urllib.request.Request(f"{server}/v1/chat/completions", body, headers)
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def user(text, *images) -> dict:
    return {
        "role": "user",
        "content": [
            *({"type": "image_url", "image_url": {"url": data_url(p)}} for p in images),
            {"type": "text", "text": text},
        ],
    }


def words(text: str) -> str:
    """Text as a browser shows it: runs of white space (and control characters) are one space."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def wait(driver, condition, what: str):
    """condition() once it is true; elements re-rendered under it meanwhile only mean: look again."""
    try:
        return WebDriverWait(driver, WAIT, 0.2, [StaleElementReferenceException]).until(lambda d: condition())
    except TimeoutException as e:
        raise AssertionError(f"the page never showed {what}") from e


def messages(driver, who: str) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, f"[data-testid={who}]")]


def send(driver, text: str | None, image):
    """Upload an image, type a question (None: the box holds it already) and send them."""
    (files,) = wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "input[type=file]"), "the chat")
    driver.execute_script("arguments[0].value = ''", files)  # ChromeDriver adds to a `multiple` input's files
    files.send_keys(str(image))
    wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "[aria-label='Uploaded files'] img"), "the upload")
    if text is not None:
        driver.find_element(By.CSS_SELECTOR, "textarea").send_keys(text)
    driver.find_element(By.CSS_SELECTOR, "button.submit-button").click()


def answered(driver) -> str:
    """The only answer in the chat, once it is whole (the page takes questions again)."""
    box = driver.find_element(By.CSS_SELECTOR, "textarea")
    wait(driver, lambda: messages(driver, "bot") and box.is_enabled(), "an answer")
    (answer,) = messages(driver, "bot")
    return answer


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Chromium and its driver: apt-get install chromium chromium-driver"
)  # checked before any fixture starts a server
def test_the_page_answers_as_the_api_does(server, browser, tiny_chat, tmp_path):
    root, driver = tiny_chat[0], browser
    image, image2 = root / "img.png", root / "img2.png"
    status, first = api(server, [user(EN, image)])
    assert status == 200 and first["choices"][0]["finish_reason"] == "length", first  # it fills the context
    answer = first["choices"][0]["message"]["content"]
    assert api(server, [user(EN)])[1]["choices"][0]["message"]["content"] != answer  # the image shows in it
    status, refused = api(
        server, [user(EN, image), {"role": "assistant", "content": answer}, user("And this?", image2)]
    )
    assert status == 400 and refused["error"]["code"] == "context_length_exceeded", refused
    status, fresh = api(server, [user(ZH, image2)])
    assert status == 200, fresh

    driver.get(server)  # the page asks for the key: any user name, the key as password
    for password in ("wrong", KEY):
        fields = wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "input"), "the login form")
        fields[0].send_keys("anyone")
        fields[1].send_keys(password)
        driver.find_element(By.XPATH, "//button[normalize-space()='Login']").click()
        if password == "wrong":
            wait(driver, lambda: "Incorrect Credentials" in driver.find_element(By.TAG_NAME, "body").text, "a refusal")
            driver.refresh()

    send(driver, EN, image)
    assert words(answered(driver)) == words(answer)
    assert messages(driver, "user")[-1] == EN

    send(driver, "And this?", image2)  # refused: the first answer filled the context
    shown = lambda: [e.text for e in driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]") if e.text]
    assert wait(driver, shown, "the error") == [refused["error"]["message"] + " Clear the conversation to go on."]
    assert driver.find_element(By.CSS_SELECTOR, "textarea").get_attribute("value") == "And this?"  # kept to edit
    assert len(messages(driver, "bot")) == 1  # and out of the conversation
    driver.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 0

    driver.find_element(By.XPATH, "//button[normalize-space()='Clear']").click()
    wait(driver, lambda: not messages(driver, "user"), "an empty chat")
    wait(driver, lambda: driver.find_elements(By.XPATH, f"//*[normalize-space()='{ZH}']"), "the examples")[-1].click()
    wait(driver, lambda: driver.find_element(By.CSS_SELECTOR, "textarea").get_attribute("value") == ZH, "the example")
    send(driver, None, image2)  # a fresh conversation: answered
    assert words(answered(driver)) == words(fresh["choices"][0]["message"]["content"])


def test_the_page_places_images_as_the_api_does():
    """Gradio's chat (content: file and text parts) -> turns and images, as the API makes them of the same
    messages: images opening the first question before the conversation, later ones as <image>; an exchange
    answered blank is left out (a prompt cannot hold an empty turn)."""
    from ziya_jax.serve.api import conversation as from_api
    from ziya_jax.serve.page import conversation as from_page

    def shown(role, text, *paths):  # a message as Gradio's chat holds it
        files = [{"type": "file", "file": {"path": path}} for path in paths]
        return {"role": role, "content": [*files, {"type": "text", "text": text}]}

    def sent(text, *urls):  # a user message as an API client sends it
        images = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        return {"role": "user", "content": [*images, {"type": "text", "text": text}]}

    chat = [shown("user", "Q1", "a"), shown("assistant", "A1"), shown("user", "Q?", "x"), shown("assistant", " ")]
    turns, paths = from_page(chat, {"text": "Q2", "files": ["b", "c"]})
    _, *expected = from_api([sent("Q1", "a"), {"role": "assistant", "content": "A1"}, sent("Q2", "b", "c")])
    assert [turns, paths] == expected
    assert turns[-1].query == "<image><image>Q2" and paths == ["a", "b", "c"]
