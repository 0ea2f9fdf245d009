// Wires the page: settings panel, API key, drag-and-drop, the composer, the mode switch.

import { Api } from './api.js';
import { Thread } from './chat.js';
import { detectGeneration, generateImage, generateVideo } from './generate.js';
import { Attachment, samplingFrom } from './media.js';
import { errorBlock } from './ui.js';

const $ = (id) => document.getElementById(id);
const NUMBERS = ['temperature', 'top_p', 'top_k', 'max_tokens', 'seed', 'fps', 'max_frames',
  'cfg_scale', 'gen_temperature', 'gen_top_k', 'video_frames'];

const api = new Api();
const thread = new Thread($('thread'), api, readSettings);
let attachment = null; // the pending attachment in the composer
let generation = null; // the running image/video generation's AbortController

// Never a blank page: anything unexpected is shown in the banner.
window.addEventListener('error', (e) => showBanner(e.message || 'unexpected error'));
window.addEventListener('unhandledrejection', (e) => showBanner((e.reason && e.reason.message) || String(e.reason)));

function showBanner(message) {
  const banner = $('banner');
  banner.textContent = message;
  banner.hidden = false;
}

/** The settings panel as values (null for an empty field). */
function readSettings() {
  const s = { system: $('system').value.trim(), video_seconds: $('video_seconds').value };
  for (const id of NUMBERS) {
    const v = $(id).value.trim();
    s[id] = v === '' || Number.isNaN(Number(v)) ? null : Number(v);
  }
  return s;
}

function setBusy(busy) {
  $('send').hidden = busy;
  $('stop').hidden = !busy;
  document.body.classList.toggle('busy', busy);
}

function setStatus(text, kind = '') {
  const el = $('status');
  el.textContent = text;
  el.dataset.kind = kind;
}

// ------------------------------------------------------------------ API key and start-up

async function askKey(message = '') {
  const dialog = $('key-dialog');
  $('key-input').value = api.key;
  $('key-error').hidden = !message;
  $('key-error').textContent = message;
  dialog.showModal();
  await new Promise((resolve) => dialog.addEventListener('close', resolve, { once: true }));
  api.setKey($('key-input').value);
}

async function connect() {
  let config = { auth_required: false };
  try {
    config = await api.json('playground/config.json');
  } catch (err) {
    setStatus('server unreachable', 'bad');
    showBanner(`Cannot reach the server: ${err.message}`);
    return;
  }
  $('key-button').hidden = !config.auth_required;
  if (config.auth_required && !api.key) await askKey();
  for (;;) {
    try {
      const models = await api.json('v1/models');
      thread.model = models.data.length ? models.data[0].id : null;
      $('model').textContent = thread.model || 'no model';
      break;
    } catch (err) {
      if (err.status === 401) { await askKey(err.message); continue; }
      setStatus('not ready', 'bad');
      showBanner(`The server answered: ${err.message}`);
      return;
    }
  }
  setStatus('ready', 'ok');
  $('banner').hidden = true;
  const gen = await detectGeneration(api);
  $('mode-image').hidden = !gen.image;
  $('mode-video').hidden = !gen.video;
  $('modes').hidden = !(gen.image || gen.video);
  $('gen-settings').hidden = !(gen.image || gen.video);
  document.body.dataset.ready = 'true';
}

// ------------------------------------------------------------------ attachments

function attach(file) {
  if (!file) return;
  if (!/^(video|image)\//.test(file.type) && !/\.(mp4|mov|mkv|webm|avi|gif|png|jpe?g|webp|bmp)$/i.test(file.name)) {
    showBanner(`${file.name}: not a video or an image`);
    return;
  }
  dropAttachment();
  attachment = new Attachment(file, api, samplingFrom(readSettings()));
  attachment.removeButton.addEventListener('click', dropAttachment);
  const box = $('attachment');
  box.replaceChildren(attachment.el);
  box.hidden = false;
  attachment.prepare(readSettings().max_tokens).catch(() => {}); // errors are shown on the card
}

function dropAttachment() {
  if (attachment) attachment.discard({ forget: true });
  attachment = null;
  $('attachment').replaceChildren();
  $('attachment').hidden = true;
}

function replanAttachment() {
  if (!attachment || attachment.fileId === null) return;
  attachment.sampling = samplingFrom(readSettings());
  attachment.replan(readSettings().max_tokens).catch(() => {});
}

// A suggested sampling applied on the card is written back into the settings panel.
$('attachment').addEventListener('sampling-changed', (e) => {
  $('max_frames').value = e.detail.max_frames ?? '';
  $('fps').value = e.detail.fps ?? '';
});
for (const id of ['fps', 'max_frames', 'max_tokens']) $(id).addEventListener('change', replanAttachment);

$('file-input').addEventListener('change', (e) => { attach(e.target.files[0]); e.target.value = ''; });

let dragDepth = 0;
window.addEventListener('dragenter', (e) => {
  if (!e.dataTransfer || !e.dataTransfer.types.includes('Files')) return;
  dragDepth += 1;
  $('dropzone').hidden = false;
});
window.addEventListener('dragleave', () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) $('dropzone').hidden = true;
});
window.addEventListener('dragover', (e) => e.preventDefault());
window.addEventListener('drop', (e) => {
  e.preventDefault();
  dragDepth = 0;
  $('dropzone').hidden = true;
  if (e.dataTransfer && e.dataTransfer.files.length) attach(e.dataTransfer.files[0]);
});

// ------------------------------------------------------------------ sending

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

async function send() {
  if (thread.busy || generation) return;
  const text = $('prompt').value.trim();
  const m = mode();
  if (m !== 'chat') {
    if (!text) return;
    $('prompt').value = '';
    $('empty').hidden = true;
    generation = new AbortController();
    setBusy(true);
    const run = m === 'image' ? generateImage : generateVideo;
    try {
      await run(api, text, readSettings(), (el) => thread.append(el), generation.signal);
    } finally {
      generation = null;
      setBusy(false);
    }
    return;
  }
  if (attachment && !attachment.ready) {
    const card = attachment.el.querySelector('.error');
    showBanner(card ? 'The attachment could not be read: remove it or choose another file.'
      : 'The attachment is still uploading: send once its frames are shown.');
    return;
  }
  if (!text && !attachment) return;
  const media = attachment;
  attachment = null;
  $('attachment').hidden = true;
  $('prompt').value = '';
  $('empty').hidden = true;
  $('banner').hidden = true;
  setBusy(true);
  try {
    await thread.ask(text, media);
  } finally {
    setBusy(false);
    $('prompt').focus();
  }
}

$('composer').addEventListener('submit', (e) => { e.preventDefault(); send(); });
$('prompt').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
$('stop').addEventListener('click', () => {
  thread.stop();
  if (generation) generation.abort();
});
$('new-thread').addEventListener('click', () => {
  thread.reset();
  dropAttachment();
  $('empty').hidden = false;
});
$('key-button').addEventListener('click', async () => {
  await askKey();
  connect();
});
$('settings-toggle').addEventListener('click', () => {
  const open = document.body.classList.toggle('settings-open');
  $('settings-toggle').setAttribute('aria-expanded', String(open));
});

connect().catch((err) => {
  setStatus('error', 'bad');
  $('thread').append(errorBlock(err));
});
