// Image and video generation, shown only when the server offers it: the page reads the
// server's OpenAPI description, so it lights up the day the routes exist, unchanged.
//   images: POST /v1/images/generations, stream with partial_images (OpenAI's
//           image_generation.partial_image / .completed events), or a JSON answer;
//   videos: the OpenAI job protocol, POST /v1/videos, poll GET /v1/videos/{id}
//           (status, progress 0-100), then GET /v1/videos/{id}/content into a <video>.

import { errorBlock, h, progressBar } from './ui.js';

export const IMAGE_PATH = '/v1/images/generations';
export const VIDEO_PATH = '/v1/videos';
const PARTIAL_IMAGES = 3;
const POLL_MS = 1000;

/** {image: bool, video: bool}: which generation routes the server's OpenAPI lists. */
export async function detectGeneration() {
  try {
    const resp = await fetch('openapi.json');
    if (!resp.ok) return { image: false, video: false };
    const paths = (await resp.json()).paths || {};
    return { image: Boolean(paths[IMAGE_PATH] && paths[IMAGE_PATH].post),
      video: Boolean(paths[VIDEO_PATH] && paths[VIDEO_PATH].post) };
  } catch {
    return { image: false, video: false }; // no OpenAPI (disabled docs): no generation controls
  }
}

function knobs(s) {
  const out = {};
  if (s.seed !== null) out.seed = s.seed;
  if (s.temperature !== null) out.temperature = s.temperature;
  if (s.top_k !== null) out.top_k = s.top_k;
  if (s.cfg_scale !== null) out.cfg_scale = s.cfg_scale;
  return out;
}

/** One generation on screen (prompt, then the picture or the clip as it comes). */
function card(kind, prompt) {
  const body = h('div', { class: 'generated' });
  const meta = h('footer', { class: 'meta' }, h('span', { class: 'muted' }, 'waiting for the model…'));
  const el = h('article', { class: `msg assistant gen-${kind}` }, h('div', { class: 'text muted' }, `${kind}: ${prompt}`), body, meta);
  return { el, body, meta };
}

export async function generateImage(api, prompt, s, mount, signal) {
  const view = card('image', prompt);
  mount(view.el);
  const img = h('img', { alt: `generated: ${prompt}`, width: 256, height: 256 });
  view.body.append(img);
  const started = performance.now();
  let partials = 0;
  const show = (b64, format) => { img.src = `data:image/${format || 'png'};base64,${b64}`; };
  try {
    const body = { prompt, n: 1, size: '256x256', stream: true, partial_images: PARTIAL_IMAGES, ...knobs(s) };
    await api.stream(IMAGE_PATH.slice(1), { body, signal }, (ev) => {
      const d = ev.data;
      if (!d) return;
      if (d.type === 'image_generation.partial_image') {
        partials += 1;
        show(d.b64_json, d.output_format);
        view.meta.replaceChildren(h('span', {}, `partial image ${partials} · ${((performance.now() - started) / 1000).toFixed(1)} s`));
      } else if (d.type === 'image_generation.completed') {
        show(d.b64_json, d.output_format);
      } else if (Array.isArray(d.data) && d.data.length) { // a JSON answer
        if (d.data[0].b64_json) show(d.data[0].b64_json, d.output_format);
        else if (d.data[0].url) img.src = d.data[0].url;
      }
    });
    view.meta.replaceChildren(h('span', {}, `done in ${((performance.now() - started) / 1000).toFixed(1)} s`),
      h('span', {}, `${partials} partial image${partials === 1 ? '' : 's'}`));
    view.el.dataset.state = 'done';
  } catch (err) {
    view.meta.replaceChildren(err.name === 'AbortError' ? h('span', { class: 'badge warn' }, 'stopped') : errorBlock(err));
    view.el.dataset.state = err.name === 'AbortError' ? 'stopped' : 'error';
  }
}

export async function generateVideo(api, prompt, s, mount, signal) {
  const view = card('video', prompt);
  mount(view.el);
  const bar = progressBar('queued');
  view.body.append(bar.el);
  try {
    let job = await api.json(VIDEO_PATH.slice(1), {
      method: 'POST', signal, body: { prompt, seconds: s.video_seconds, ...knobs(s) } });
    while (job.status === 'queued' || job.status === 'in_progress') {
      bar.set((job.progress || 0) / 100, `${job.status.replace('_', ' ')} · ${job.progress || 0}%`);
      await sleep(POLL_MS, signal);
      job = await api.json(`v1/videos/${encodeURIComponent(job.id)}`, { signal });
    }
    if (job.status !== 'completed') {
      const message = (job.error && job.error.message) || `the video job ended as ${job.status}`;
      throw Object.assign(new Error(message), { type: job.error && job.error.code });
    }
    bar.finish('completed');
    const blob = await api.blob(`v1/videos/${encodeURIComponent(job.id)}/content`, { signal });
    const video = h('video', { controls: true, loop: true, autoplay: true, muted: true, playsinline: true });
    video.src = URL.createObjectURL(blob);
    view.body.append(video);
    view.meta.replaceChildren(h('span', {}, `${job.id} · ${job.seconds || s.video_seconds} s · ${job.size || ''}`));
    view.el.dataset.state = 'done';
  } catch (err) {
    bar.fail(err.name === 'AbortError' ? 'stopped' : 'failed');
    view.meta.replaceChildren(err.name === 'AbortError' ? h('span', { class: 'badge warn' }, 'stopped') : errorBlock(err));
    view.el.dataset.state = err.name === 'AbortError' ? 'stopped' : 'error';
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    if (signal) signal.addEventListener('abort', () => { clearTimeout(timer); reject(new DOMException('stopped', 'AbortError')); }, { once: true });
  });
}
