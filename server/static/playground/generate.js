// Image and video generation, shown only when the server can draw (playground/config.json
// says so: the routes are always there, but without a VQGAN they refuse every request).
//   images: POST /v1/images/generations with stream + partial_images: SSE events named
//           image_generation.partial_image (partial_image_index, b64_json, size, output_format)
//           then image_generation.completed (b64_json, size, usage), then [DONE];
//   videos: the OpenAI job protocol: POST /v1/videos -> a video object (status queued |
//           in_progress | completed | failed, progress 0-100, error {code, message});
//           poll GET /v1/videos/{id}; GET /v1/videos/{id}/content is the MP4. Stop deletes
//           the job (DELETE /v1/videos/{id}), which also stops its engine request.

import { ApiError } from './api.js';
import { errorBlock, fmtInt, h, progressBar } from './ui.js';

export const IMAGE_PATH = 'v1/images/generations';
export const VIDEO_PATH = 'v1/videos';
const PARTIAL_IMAGES = 3; // OpenAI's most
const POLL_MS = 500;

/** {image: bool, video: bool}: what the server can draw (nothing while it is loading). */
export async function detectGeneration(api) {
  try {
    const config = await api.json('playground/config.json');
    return config.generation || { image: false, video: false };
  } catch {
    return { image: false, video: false };
  }
}

/** The generation settings as the image request's extras (absent: the server's defaults). */
function imageKnobs(s) {
  const out = {};
  if (s.seed !== null) out.seed = s.seed;
  if (s.gen_temperature !== null) out.temperature = s.gen_temperature;
  if (s.gen_top_k !== null) out.top_k = s.gen_top_k;
  if (s.cfg_scale !== null) out.cfg_scale = s.cfg_scale;
  return out;
}

/** The same settings for a video: LWM has one set for the first frame (`_image`) and one
 * for the frames after it (`_video`); the page's one set goes to both. */
function videoKnobs(s) {
  const out = {};
  if (s.seed !== null) out.seed = s.seed;
  for (const kind of ['image', 'video']) {
    if (s.gen_temperature !== null) out[`temperature_${kind}`] = s.gen_temperature;
    if (s.gen_top_k !== null) out[`top_k_${kind}`] = s.gen_top_k;
    if (s.cfg_scale !== null) out[`cfg_scale_${kind}`] = s.cfg_scale;
  }
  if (s.video_frames !== null) out.n_frames = s.video_frames;
  else out.seconds = s.video_seconds;
  return out;
}

const seconds = (t0) => `${((performance.now() - t0) / 1000).toFixed(1)} s`;

/** One generation on screen (prompt, then the picture or the clip as it comes). */
function card(kind, prompt) {
  const body = h('div', { class: 'generated' });
  const meta = h('footer', { class: 'meta' }, h('span', { class: 'muted' }, 'waiting for the model…'));
  const el = h('article', { class: `msg assistant gen-${kind}` }, h('div', { class: 'text muted' }, `${kind}: ${prompt}`), body, meta);
  return { el, body, meta };
}

function side(size) { // "256x256" -> 256
  const n = parseInt(String(size || '').split('x')[0], 10);
  return Number.isFinite(n) && n > 0 ? n : null;
}

/** The card when a generation ends early: "stopped" (the user), or the error as the server put it. */
function showEnded(view, err, bar) {
  const aborted = err.name === 'AbortError';
  if (bar) bar.fail(aborted ? 'stopped' : 'failed');
  view.meta.replaceChildren(aborted ? h('span', { class: 'badge warn' }, 'stopped') : errorBlock(err));
  view.el.dataset.state = aborted ? 'stopped' : 'error';
}

export async function generateImage(api, prompt, s, mount, signal) {
  const view = card('image', prompt);
  mount(view.el);
  const img = h('img', { alt: `generated: ${prompt}` });
  const show = (d) => {
    if (!img.isConnected) {
      view.body.append(img);
      view.el.scrollIntoView({ block: 'end' }); // the card grew: keep the picture in sight
    }
    const n = side(d.size);
    if (n) { img.width = n; img.height = n; }
    img.src = `data:image/${d.output_format};base64,${d.b64_json}`;
  };
  const started = performance.now();
  let partials = 0;
  let final = null;
  try {
    const body = { prompt, n: 1, stream: true, partial_images: PARTIAL_IMAGES, output_format: 'png', ...imageKnobs(s) };
    await api.stream(IMAGE_PATH, { body, signal }, (ev) => {
      const d = ev.data;
      if (!d) return; // a comment (keep-alive)
      if (ev.event === 'image_generation.partial_image') {
        partials += 1;
        img.dataset.partial = d.partial_image_index;
        show(d);
        view.meta.replaceChildren(h('span', {}, `partial image ${d.partial_image_index + 1} of ${PARTIAL_IMAGES}`),
          h('span', {}, seconds(started)));
      } else if (ev.event === 'image_generation.completed') {
        final = d;
        delete img.dataset.partial;
        img.dataset.final = 'true';
        show(d);
      }
    });
    if (!final) throw new ApiError('the image stream ended before the image was complete');
    const usage = final.usage;
    view.meta.replaceChildren(h('span', {}, `done in ${seconds(started)}`),
      h('span', {}, `${partials} partial image${partials === 1 ? '' : 's'}`),
      h('span', {}, final.size),
      usage ? h('span', {}, `${fmtInt(usage.input_tokens)} prompt + ${fmtInt(usage.output_tokens)} image tokens`) : null);
    view.el.dataset.state = 'done';
  } catch (err) {
    showEnded(view, err);
  }
}

export async function generateVideo(api, prompt, s, mount, signal) {
  const view = card('video', prompt);
  mount(view.el);
  const bar = progressBar('submitting…');
  view.body.append(bar.el);
  const started = performance.now();
  let job = null;
  try {
    job = await api.json(VIDEO_PATH, { method: 'POST', signal, body: { prompt, ...videoKnobs(s) } });
    view.el.dataset.videoId = job.id;
    while (job.status === 'queued' || job.status === 'in_progress') {
      bar.set(job.progress / 100, `${job.status.replace('_', ' ')} · ${job.progress}%`);
      await sleep(POLL_MS, signal);
      job = await api.json(`${VIDEO_PATH}/${encodeURIComponent(job.id)}`, { signal });
    }
    if (job.status !== 'completed') {
      const e = job.error || {};
      throw new ApiError(e.message || `the video job ended as ${job.status}`, { code: e.code || null });
    }
    bar.finish('completed · 100%');
    const blob = await api.blob(`${VIDEO_PATH}/${encodeURIComponent(job.id)}/content`, { signal });
    const video = h('video', { controls: true, loop: true, autoplay: true, muted: true, playsinline: true });
    const n = side(job.size);
    if (n) { video.width = n; video.height = n; }
    video.src = URL.createObjectURL(blob);
    view.body.append(video);
    view.el.scrollIntoView({ block: 'end' });
    view.meta.replaceChildren(h('span', {}, `done in ${seconds(started)}`), h('span', {}, `${job.seconds} s`),
      h('span', {}, job.size), h('span', { class: 'muted' }, job.id));
    view.el.dataset.state = 'done';
  } catch (err) {
    if (err.name === 'AbortError' && job && (job.status === 'queued' || job.status === 'in_progress')) {
      // Stop means stop: the job would otherwise keep drawing for nobody.
      api.json(`${VIDEO_PATH}/${encodeURIComponent(job.id)}`, { method: 'DELETE' })
        .then(() => { view.el.dataset.deleted = 'true'; })
        .catch((e) => view.meta.append(errorBlock(e, 'Could not delete the job')));
    }
    showEnded(view, err, bar);
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal && signal.aborted) { reject(new DOMException('stopped', 'AbortError')); return; }
    const timer = setTimeout(resolve, ms);
    if (signal) signal.addEventListener('abort', () => { clearTimeout(timer); reject(new DOMException('stopped', 'AbortError')); }, { once: true });
  });
}
