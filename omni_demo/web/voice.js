// One-tap voice messages. Gradio's MultimodalTextbox needs five clicks (mic, start, stop, attach,
// send); here the mic button starts recording at once and its stop button attaches the clip and,
// with "Send voice messages when recording stops" on, sends it. Runs with player.js.
function waitFor(find, timeoutMs) {
  return new Promise(resolve => {
    const until = performance.now() + timeoutMs;
    (function poll() {
      const found = find();
      if (found || performance.now() > until) resolve(found || null);
      else setTimeout(poll, 50);
    })();
  });
}
const inBox = selector => document.querySelector(`#textbox ${selector}`);
const autoSend = () => !!document.querySelector('#autosend input:checked');

document.addEventListener('click', async e => {
  const button = e.target.closest && e.target.closest('#textbox button');
  const label = button && button.getAttribute('aria-label');
  if (label === 'Record audio' && !button.classList.contains('recording')) {
    const start = await waitFor(() => inBox("button[aria-label='Start recording']"), 3000);
    if (start) start.click();
  } else if (label === 'Stop recording') {
    const attach = await waitFor(() => inBox("button[aria-label='Attach audio']"), 5000);
    if (!attach) return;
    attach.click();
    if (!autoSend()) return;
    const attached = await waitFor(() => inBox("button[aria-label='Remove file']"), 15000);
    const send = attached && await waitFor(() => inBox('.submit-button:not([disabled])'), 5000);
    if (send) setTimeout(() => send.click(), 150);  // the clip's upload settles first
  }
}, true);
