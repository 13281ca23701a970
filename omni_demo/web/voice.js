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

// The voice call. Start call asks for the microphone (echo cancellation on: the assistant's voice
// from the speakers is taken out of what is sent) and the server's messages start and stop the
// call's own hidden streaming microphone (#call-mic). Each reply's first audio message carries the
// server's part of the wait; the player adds its own, and the readout shows the last turn and
// the median and worst over the call.
{
  const media = navigator.mediaDevices;
  if (media && media.getUserMedia) {
    const getUserMedia = media.getUserMedia.bind(media);
    media.getUserMedia = c => getUserMedia(c && c.audio === true
      ? {...c, audio: {echoCancellation: true, noiseSuppression: true, autoGainControl: true}} : c);
  }
}
const micButton = name => [...document.querySelectorAll('#call-mic button')]
  .find(b => b.textContent.trim() === name || b.getAttribute('aria-label') === name);

window.omniCall = {
  turns: [],  // one per reply heard: {total, vad, first_text, first_audio, network, player} in seconds
  prepare() {
    window.omniPlayer.unlock();  // inside the click: the reply may play without another gesture
    this.turns = [];
    renderLatency();
    if (!window.isSecureContext || !navigator.mediaDevices) {
      window.omniPlayer.toast('The voice call needs the microphone, which browsers allow only on https or '
                              + 'localhost pages. Open the app through its https share link or on this machine.');
    } else if (navigator.permissions) {
      navigator.permissions.query({name: 'microphone'}).then(p => {
        if (p.state === 'denied') window.omniPlayer.toast('Microphone access is blocked for this page: allow it '
                                                          + 'in the browser\'s site settings, then start the call again.');
      }).catch(() => {});
    }
  },
  async control(command) {
    const name = command === 'start' ? 'Record' : 'Stop';
    const button = await waitFor(() => micButton(name), 5000);
    if (button) button.click();
  },
  // The player heard a call reply's first sound: add the turn to the readout.
  heard(reply) {
    const l = reply.latency;
    const player = (reply.heardAt - reply.arrivedAt) / 1000;
    const network = l.transit !== null && l.transit >= 0 && l.transit < 5000 ? l.transit / 1000 : 0;
    this.turns.push({total: l.speech_end_to_audio_s + network + player, vad: l.vad_s, first_text: l.first_text_s,
                     first_audio: l.first_audio_s, network, player});
    renderLatency();
  },
};

function renderLatency() {
  const box = document.querySelector('#call-latency .call-latency');
  if (!box) return;
  const turns = window.omniCall.turns;
  if (!turns.length) { box.textContent = ''; return; }
  const t = turns[turns.length - 1];
  const s = v => v === null || v === undefined ? '–' : `${v.toFixed(2)} s`;
  let text = `Last turn: first sound ${s(t.total)} after you stopped speaking (pause detection ${s(t.vad)}, `
    + `first text ${s(t.first_text)}, first audio ${s(t.first_audio)}, network ${s(t.network)}, player ${s(t.player)}).`;
  if (turns.length > 1) {
    const totals = turns.map(x => x.total).sort((a, b) => a - b);
    const mid = totals.length >> 1;
    const median = totals.length % 2 ? totals[mid] : (totals[mid - 1] + totals[mid]) / 2;
    text += ` Over ${turns.length} turns: median ${s(median)}, worst ${s(totals[totals.length - 1])}.`;
  }
  box.textContent = text;
}
