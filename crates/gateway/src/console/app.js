// The Baton console: plain JavaScript, no build step, nothing from outside the gateway. Every
// page reads the gateway's JSON (the same API as the CLI) and polls it for live updates. Text
// from the store is always set as text, never parsed as HTML.
'use strict';

const S = { overview: null, timer: null, seq: 0 };
const SVGNS = 'http://www.w3.org/2000/svg';
const IN_FLIGHT = ['running', 'compensating', 'succeeded'];
const WAITING_PHASES = ['running', 'retry_wait', 'compensating', 'compensation_retry_wait', 'to_compensate'];
const COLORS = {
  started: '#6b7280', sent: '#1f5fbf', done: '#1a7f37', refused: '#c62828', failed: '#c62828',
  timed_out: '#b26a00', retry_scheduled: '#b26a00', late_reply_ignored: '#9c6500', compensated: '#7b3fa0',
  compensation_failed: '#c62828', succeeded: '#1a7f37', completed: '#1a7f37', rolled_back: '#7b3fa0',
  cancelled: '#7b3fa0', operator_retry: '#1f5fbf', deadline_passed: '#b26a00', cancel_requested: '#7b3fa0',
  cancel_refused: '#b26a00', definition_missing: '#c62828', definition_changed: '#c62828', resumed: '#1f5fbf',
};
const PHASE_COLORS = {
  pending: '#eceff3', running: '#dde8fb', retry_wait: '#fbecd0', done: '#d7f0dd', refused: '#fde0e0',
  to_compensate: '#fbecd0', compensating: '#efe3f5', compensation_retry_wait: '#fbecd0',
  compensated: '#efe3f5', compensation_failed: '#fde0e0',
};

// ---- small helpers -------------------------------------------------------------------------

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  set(el, attrs, kids);
  return el;
}

function svg(tag, attrs, ...kids) {
  const el = document.createElementNS(SVGNS, tag);
  set(el, attrs, kids);
  return el;
}

function set(el, attrs, kids) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
}

async function api(path, opts) {
  const r = await fetch(path, opts);
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  return { status: r.status, ok: r.ok, body };
}

const when = (ms) => (ms ? new Date(ms).toISOString().replace('T', ' ').slice(0, 23) : '');
const short = (id) => (id ? String(id).slice(0, 8) : '');
const badge = (state) => h('span', { class: 'badge s-' + state, 'data-state': state }, state);

function queueLink(queue) {
  const o = S.overview;
  if (!o) return queue;
  // The vhost comes as the management API spells it in a path (percent-encoded).
  const href = `${o.mgmt_url}/#/queues/${o.vhost}/${encodeURIComponent(queue)}`;
  return h('a', { href, target: '_blank', rel: 'noopener', class: 'queue', 'data-queue': queue }, queue);
}

function traceLink(traceId) {
  if (!traceId || !S.overview) return null;
  return h('a', { href: `${S.overview.trace_url}/${traceId}`, target: '_blank', rel: 'noopener', class: 'trace' },
    'trace ' + short(traceId));
}

function hashParams() {
  const [path, query] = location.hash.replace(/^#/, '').split('?');
  return { path: path || '/', params: new URLSearchParams(query || '') };
}

function go(path, params) {
  const q = params && [...params].length ? '?' + params.toString() : '';
  location.hash = '#' + path + q;
}

// A page's poll: one at a time, dropped when the page changes.
function poll(fn, ms) {
  const seq = ++S.seq;
  clearTimeout(S.timer);
  const tick = async () => {
    if (seq !== S.seq) return;
    try {
      await fn();
      document.getElementById('live').className = 'live';
    } catch (e) {
      document.getElementById('live').className = 'live stale';
      console.error(e);
    }
    if (seq === S.seq && ms) S.timer = setTimeout(tick, ms);
  };
  return tick();
}

function replace(el, ...kids) {
  el.replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined));
}

// ---- the frame ---------------------------------------------------------------------------

// The page of each mode `baton up` runs; a mode without one of its own gets the chain of its
// spaces, which every mode has (the services' inboxes and outboxes).
const MODE_PAGES = {
  workflow: ['Sagas', '/sagas'],
  // The saga of the steps that must complete; the follow-ups show on each space's chain.
  hybrid: ['Sagas', '/sagas'],
  events: ['Event chains', '/spaces'],
};

function modePage(mode) {
  return MODE_PAGES[mode] || [mode + ' spaces', '/spaces'];
}

function nav() {
  const o = S.overview;
  const here = hashParams().path;
  const [title, path] = modePage(o.mode);
  const items = [[title, path]];
  if (path !== '/spaces') items.push(['Spaces', '/spaces']);
  items.push(['Health', '/health'], ['Comparison', '/compare']);
  replace(document.getElementById('nav'),
    items.map(([t, p]) => h('a', { href: '#' + p, class: here.startsWith(p) ? 'on' : null }, t)));
  replace(document.getElementById('mode'), `${o.mode} mode · ${o.workflow} · gateway ${o.instance}`);
}

async function loadOverview() {
  const r = await api('/console/api/overview');
  if (!r.ok) throw new Error('overview: ' + r.status);
  S.overview = r.body;
  document.body.dataset.mode = r.body.mode;
}

async function route() {
  const main = document.getElementById('main');
  try {
    if (!S.overview) await loadOverview();
  } catch (e) {
    replace(main, h('p', { class: 'msg err' }, 'The gateway did not answer: ' + e.message));
    return;
  }
  nav();
  const { path, params } = hashParams();
  const parts = path.split('/').filter(Boolean);
  main.replaceChildren();
  main.dataset.page = parts[0] || 'home';
  switch (parts[0]) {
    case 'sagas': return sagasPage(main, params);
    case 'saga': return sagaPage(main, parts[1]);
    case 'spaces': return spacesPage(main, params);
    case 'space': return spacePage(main, parts[1]);
    case 'health': return healthPage(main);
    case 'compare': return comparePage(main);
    default: return go(modePage(S.overview.mode)[1]);
  }
}

// ---- the saga list -----------------------------------------------------------------------

function sagasPage(main, params) {
  const o = S.overview;
  main.append(h('h1', null, 'Sagas'));
  const cards = h('div', { class: 'cards', id: 'counts' });
  main.append(cards);
  const field = (label, input) => h('label', null, label, input);
  const state = h('select', { name: 'state' }, h('option', { value: '' }, 'any state'),
    o.states.map((s) => h('option', { value: s, selected: params.get('state') === s }, s)));
  // The workflows and versions come with the counts (GET /console/api/summary), after the
  // rows: until then each offers what the page asks for.
  const workflow = h('select', { name: 'workflow' });
  const version = h('select', { name: 'version' });
  const choices = (versions) => {
    const workflows = [...new Set(versions.map((v) => v.workflow).concat([o.workflow, params.get('workflow')]).filter(Boolean))];
    replace(workflow, h('option', { value: '' }, 'any workflow'),
      workflows.map((w) => h('option', { value: w, selected: params.get('workflow') === w }, w)));
    const hashes = versions.filter((v) => v.hash);
    if (params.get('version') && !hashes.some((v) => v.hash === params.get('version'))) hashes.push({ workflow: '', hash: params.get('version') });
    replace(version, h('option', { value: '' }, 'any version'),
      hashes.map((v) => h('option', { value: v.hash, selected: params.get('version') === v.hash }, `${v.workflow} ${v.hash.slice(0, 12)}`)));
  };
  choices([]);
  const at = (k) => h('input', { type: 'datetime-local', name: k, step: 1,
    value: params.get(k) ? new Date(Number(params.get(k))).toISOString().slice(0, 19) : null });
  const since = at('since'), until = at('until');
  const q = h('input', { type: 'search', name: 'q', placeholder: 'space name, owner, saga or space id', size: 32, value: params.get('q') });
  const apply = (e) => {
    e.preventDefault();
    const p = new URLSearchParams();
    for (const [k, el] of [['state', state], ['workflow', workflow], ['version', version], ['q', q]]) if (el.value) p.set(k, el.value.trim());
    for (const [k, el] of [['since', since], ['until', until]]) if (el.value) p.set(k, String(Date.parse(el.value + 'Z')));
    go('/sagas', p);
  };
  main.append(h('form', { class: 'filters', onsubmit: apply },
    field('State', state), field('Workflow', workflow), field('Version', version), field('Started since (UTC)', since), field('Started before (UTC)', until),
    field('Search', q), h('button', { type: 'submit' }, 'Apply'),
    h('a', { href: '#/sagas' }, 'clear')));
  const bulk = h('div', { class: 'actions' });
  const found = h('div', { id: 'found' });
  const table = h('div', { id: 'sagas' });
  const pager = h('div', { class: 'pager' });
  main.append(found, bulk, table, pager);

  const selected = new Set();
  const bulkMsg = h('span', { class: 'msg' });
  const bulkRun = (what) => async () => {
    const ids = [...selected];
    if (!ids.length || !confirm(`${what} ${ids.length} saga(s)?`)) return;
    let okN = 0, refused = [];
    for (const [i, id] of ids.entries()) {
      replace(bulkMsg, `${what}: ${i + 1}/${ids.length}…`);
      const r = await api(`/workflows/${id}/${what}`, { method: 'POST' });
      if (r.status < 300) okN++; else refused.push(`${short(id)}: ${r.body && r.body.error}`);
    }
    bulkMsg.className = refused.length ? 'msg err' : 'msg';
    replace(bulkMsg, `${what}: ${okN} accepted, ${refused.length} refused. ${refused.slice(0, 3).join('; ')}`);
    selected.clear();
    refresh();
  };
  replace(bulk, h('button', { id: 'bulk-retry', onclick: bulkRun('retry') }, 'Retry selected'),
    h('button', { id: 'bulk-cancel', class: 'danger', onclick: bulkRun('cancel') }, 'Cancel selected'), bulkMsg);

  // Every filter and the search go to GET /workflows, which answers from the orchestrator's
  // store whichever gateway took the request.
  const listQuery = new URLSearchParams();
  for (const k of ['state', 'workflow', 'version', 'since', 'until', 'q', 'cursor']) if (params.get(k)) listQuery.set(k, params.get(k).trim());

  // The cards, and the choices once; not awaited by the rows.
  let chosen = false;
  async function summary() {
    const r = await api('/console/api/summary');
    if (!r.ok) return;
    replace(cards, Object.entries(r.body.counts).map(([s, n]) =>
      h('div', { class: 'card', 'data-state': s, onclick: () => go('/sagas', new URLSearchParams({ state: s })) },
        h('b', null, n), badge(s))));
    if (!chosen && document.activeElement !== workflow && document.activeElement !== version) { choices(r.body.versions); chosen = true; }
  }

  async function refresh() {
    const started = performance.now();
    const page = await api('/workflows?' + listQuery.toString());
    if (!page.ok) { replace(table, h('p', { class: 'msg err' }, page.body && page.body.error)); return; }
    const rows = page.body.workflows;
    replace(found, h('span', { class: 'muted', id: 'took', 'data-ms': Math.round(performance.now() - started) },
      `${rows.length}${page.body.next_cursor ? '+' : ''} saga(s), read in ${Math.round(performance.now() - started)} ms`));
    const all = h('input', { type: 'checkbox', title: 'select every saga of this page',
      onchange: (e) => { for (const r of rows) e.target.checked ? selected.add(r.id) : selected.delete(r.id); refresh(); } });
    replace(table, h('table', { class: 'sagas' },
      h('thead', null, h('tr', null, h('th', null, all), ['Saga', 'Space', 'Name', 'Owner', 'Workflow', 'State', 'Answer', 'Started', 'Updated'].map((t) => h('th', null, t)))),
      h('tbody', null, rows.map((r) => h('tr', { 'data-id': r.id, 'data-state': r.status },
        h('td', null, h('input', { type: 'checkbox', checked: selected.has(r.id),
          onchange: (e) => (e.target.checked ? selected.add(r.id) : selected.delete(r.id)) })),
        h('td', null, h('a', { href: '#/saga/' + r.id, class: 'mono' }, short(r.id))),
        h('td', null, h('a', { href: '#/space/' + r.space_id, class: 'mono' }, short(r.space_id))),
        h('td', null, r.name ?? ''), h('td', null, r.owner ?? ''), h('td', null, r.workflow), h('td', null, badge(r.status)), h('td', null, r.answer_status ?? ''),
        h('td', null, when(r.created_at_ms)), h('td', null, when(r.updated_at_ms))))),
    ), rows.length ? null : h('p', { class: 'muted' }, 'No saga matches.'));
    const next = page.body.next_cursor;
    replace(pager, params.get('cursor') ? h('a', { href: '#/sagas?' + without(params, 'cursor') }, '⟵ newest') : null,
      next ? h('a', { href: '#/sagas?' + withParam(params, 'cursor', next), id: 'older' }, 'older ⟶') : null);
  }
  // Live on the first page only: a later page stays as it was read.
  // The counts read every saga (0.6 s with 100,000 on SQLite): every tenth tick, 30 s apart.
  let tick = 0;
  return poll(async () => { await refresh(); if (tick++ % 10 === 0) summary().catch(console.error); }, params.get('cursor') ? 0 : 3000);
}

function without(params, key) { const p = new URLSearchParams(params); p.delete(key); return p.toString(); }
function withParam(params, key, v) { const p = new URLSearchParams(params); p.set(key, v); return p.toString(); }

function requestsTable(rows) {
  const workflow = S.overview.mode === 'workflow';
  return h('table', { class: 'requests' },
    h('thead', null, h('tr', null, ['Space', 'Name', 'Owner', 'Mode', 'Requested', 'Told', 'Outcome', ''].map((t) => h('th', null, t)))),
    h('tbody', null, rows.map((r) => h('tr', { 'data-space': r.space_id },
      h('td', null, h('a', { href: '#/space/' + r.space_id, class: 'mono' }, short(r.space_id))),
      h('td', null, r.name), h('td', null, r.owner), h('td', null, r.mode), h('td', null, when(r.requested_at_ms)),
      h('td', null, r.told_status ?? '—'), h('td', null, r.outcome_status ?? '—'),
      h('td', null, workflow && r.saga_id !== r.space_id ? h('a', { href: '#/saga/' + r.saga_id }, 'saga') : null)))),
  );
}

// ---- one saga ------------------------------------------------------------------------------

function sagaPage(main, id) {
  const head = h('div', { class: 'panel', id: 'saga-head' });
  const waiting = h('div', { id: 'waiting' });
  const flow = h('div', { class: 'panel', id: 'flow' });
  const timeline = h('div', { class: 'panel', id: 'timeline' });
  const sequence = h('div', { class: 'panel', id: 'sequence' });
  const history = h('div', { id: 'history' });
  const nested = h('div', { id: 'nested' });
  main.append(h('h1', null, 'Saga ', h('span', { class: 'mono' }, id)), head, waiting,
    h('h2', null, 'Flow'), flow, h('h2', null, 'Timeline'), timeline, h('h2', null, 'Sequence'), sequence,
    h('h2', null, 'Every line of its history'), history, nested);
  const msg = h('span', { class: 'msg', id: 'action-msg' });
  let request = null;
  return poll(async () => {
    const r = await api('/workflows/' + id);
    if (!r.ok) { replace(head, h('p', { class: 'msg err' }, (r.body && r.body.error) || 'no such saga')); return; }
    const v = r.body;
    if (!request) {
      const q = await api('/console/api/requests?' + new URLSearchParams({ q: v.space_id }));
      request = (q.ok && q.body.requests[0]) || {};
    }
    main.dataset.state = v.status;
    const act = (what) => async () => {
      if (!confirm(`${what} saga ${id}?`)) return;
      replace(msg, what + '…');
      const a = await api(`/workflows/${id}/${what}`, { method: 'POST' });
      msg.className = a.status < 300 ? 'msg' : 'msg err';
      replace(msg, `${a.status}: ${(a.body && (a.body.message || a.body.error)) || ''}`);
    };
    const canRetry = v.status === 'compensation_failed' || v.status === 'definition_missing';
    const canCancel = v.status === 'running';
    replace(head,
      h('dl', { class: 'kv' },
        h('dt', null, 'State'), h('dd', null, badge(v.status)),
        h('dt', null, 'Workflow'), h('dd', null, v.workflow, ' ', h('span', { class: 'mono muted' }, (v.definition_hash || '').slice(0, 12))),
        h('dt', null, 'Space'), h('dd', null, h('a', { href: '#/space/' + v.space_id, class: 'mono' }, v.space_id),
          request.name ? ` — ${request.name}, owner ${request.owner}` : ''),
        h('dt', null, 'Started'), h('dd', null, when(v.created_at_ms), ', last change ', when(v.updated_at_ms)),
        h('dt', null, 'Client told'), h('dd', null, v.answer_status ?? 'nothing yet'),
        v.failure ? [h('dt', null, 'Failure'), h('dd', null, `${v.failure.service} (${v.failure.status}): ${v.failure.reason}`)] : null,
        v.trace_id ? [h('dt', null, 'Trace'), h('dd', null, traceLink(v.trace_id))] : null),
      h('div', { class: 'actions' },
        canRetry ? h('button', { id: 'retry', onclick: act('retry') }, 'Retry') : null,
        canCancel ? h('button', { id: 'cancel', class: 'danger', onclick: act('cancel') }, 'Cancel') : null,
        msg));
    replace(waiting, waitingOn(v));
    replace(flow, flowDiagram(v));
    replace(timeline, timelineDiagram(v));
    replace(sequence, sequenceDiagram(v));
    replace(history, historyTable(v));
    replace(nested, nestedSagas(v));
  }, 2000);
}

// A child saga's parent, and the child sagas a saga's steps ran, each nested in it: its state,
// its flow and every line of its history (and its own children, nested again).
function nestedSagas(v) {
  const parent = v.parent_id ? h('p', { class: 'muted', id: 'parent-saga' }, `Child saga of step ${v.parent_step + 1} of `,
    h('a', { href: '#/saga/' + v.parent_id, class: 'mono' }, v.parent_id)) : null;
  const children = (v.children || []).map((c) => h('section', { class: 'panel child-saga', 'data-child': c.id, 'data-state': c.status },
    h('h3', null, `Step ${c.parent_step + 1} ran child saga `, h('a', { href: '#/saga/' + c.id, class: 'mono' }, c.id),
      ' ', c.workflow, ' ', badge(c.status)),
    flowDiagram(c), historyTable(c), nestedSagas({ ...c, parent_id: null })));
  return [parent, children.length ? h('h2', null, 'Child sagas') : null, ...children];
}

// The step the saga waits on, its attempts and its last failure.
function waitingOn(v) {
  if (!IN_FLIGHT.includes(v.status) && v.status !== 'compensation_failed') return null;
  const s = v.steps.find((x) => WAITING_PHASES.includes(x.phase) || x.phase === 'compensation_failed');
  if (!s) return null;
  const lastFailure = [...v.history].reverse().find((x) => x.step === s.step &&
    ['failed', 'timed_out', 'refused', 'compensation_failed'].includes(x.event));
  return h('div', { class: 'panel', 'data-step': s.step },
    h('b', null, 'Waiting on '), s.step, ' ', badge(s.phase),
    ` — ${s.attempts} attempt(s), ${s.compensation_attempts} compensation attempt(s)`,
    lastFailure ? h('div', { class: 'muted' }, `last failure ${when(lastFailure.at_ms)}: ${lastFailure.event}${lastFailure.detail ? ': ' + lastFailure.detail : ''}`) : null);
}

// The workflow's diagram, each step's state on it: one column per group (steps of a group run
// in parallel), arrows from group to group.
function flowDiagram(v) {
  const groups = [];
  for (const s of v.steps) (groups[s.group] = groups[s.group] || []).push(s);
  const W = 150, H = 54, GX = 60, GY = 16;
  const tallest = Math.max(1, ...groups.map((g) => (g ? g.length : 0)));
  const width = groups.length * (W + GX) + 20, height = tallest * (H + GY) + 20;
  const root = svg('svg', { width, height, class: 'flow', role: 'img', 'aria-label': 'workflow steps and their states' });
  root.append(svg('defs', null, svg('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
    svg('path', { d: 'M0,0 L10,5 L0,10 z', fill: '#9aa3b2' }))));
  groups.forEach((g, gi) => {
    if (!g) return;
    const x = 10 + gi * (W + GX);
    g.forEach((s, si) => {
      const y = 10 + si * (H + GY) + (tallest - g.length) * (H + GY) / 2;
      root.append(svg('g', { class: 'step', 'data-step': s.step, 'data-phase': s.phase },
        svg('rect', { x, y, width: W, height: H, rx: 6, fill: PHASE_COLORS[s.phase] || '#fff', stroke: '#9aa3b2' }),
        svg('text', { x: x + 10, y: y + 20, 'font-weight': 600 }, s.step),
        svg('text', { x: x + 10, y: y + 38 }, `${s.phase} · ${s.attempts}×`),
        svg('title', null, `${s.step}: ${s.phase}, ${s.attempts} attempt(s), ${s.compensation_attempts} compensation attempt(s)`)));
    });
    if (gi + 1 < groups.length) {
      root.append(svg('line', { x1: x + W + 4, y1: height / 2, x2: x + W + GX - 4, y2: height / 2, stroke: '#9aa3b2', 'marker-end': 'url(#arrow)' }));
    }
  });
  return root;
}

// Every line of the history on a time axis, one lane per step.
function timelineDiagram(v) {
  const lanes = ['saga', ...v.steps.map((s) => s.step)];
  const t0 = v.created_at_ms;
  const t1 = Math.max(t0 + 1, ...v.history.map((x) => x.at_ms));
  const L = 110, W = 900, LH = 28;
  const height = lanes.length * LH + 40;
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - 20);
  const root = svg('svg', { width: W, height, class: 'timeline', role: 'img', 'aria-label': 'the saga history on a time axis' });
  lanes.forEach((lane, i) => {
    const y = 20 + i * LH;
    root.append(svg('text', { x: 4, y: y + 4 }, lane), svg('line', { x1: L, y1: y, x2: W - 10, y2: y, stroke: '#eceff3' }));
  });
  const axisY = 20 + lanes.length * LH;
  root.append(svg('line', { class: 'axis', x1: L, y1: axisY - 10, x2: W - 10, y2: axisY - 10 }));
  for (let k = 0; k <= 4; k++) {
    const t = t0 + ((t1 - t0) * k) / 4;
    root.append(svg('text', { x: x(t) - 10, y: axisY + 6, fill: '#6b7280' }, `+${Math.round(t - t0)} ms`));
  }
  v.history.forEach((e, i) => {
    const lane = Math.max(0, lanes.indexOf(e.step || 'saga'));
    const y = 20 + lane * LH;
    const undo = e.action === 'undo';
    root.append(svg('g', { class: 'entry', 'data-event': e.event, 'data-step': e.step || 'saga', 'data-index': i },
      undo ? svg('rect', { x: x(e.at_ms) - 5, y: y - 5, width: 10, height: 10, fill: COLORS[e.event] || '#333' })
        : svg('circle', { cx: x(e.at_ms), cy: y, r: 5, fill: COLORS[e.event] || '#333' }),
      svg('title', null, `+${e.at_ms - t0} ms ${e.step || 'saga'} ${e.action || ''} #${e.attempt} ${e.event}${e.detail ? ': ' + e.detail : ''}`)));
  });
  return root;
}

// Who sent what to whom, through which queue, in order.
function sequenceDiagram(v) {
  const actors = ['gateway', 'orchestrator', ...v.steps.map((s) => s.step)];
  const CW = 130, RH = 26, top = 30;
  const msgs = [];
  for (const e of v.history) {
    const svc = e.step;
    const label = `${e.action || ''} #${e.attempt}`.trim();
    switch (e.event) {
      case 'started': msgs.push({ e, from: 'gateway', to: 'orchestrator', text: 'start', queue: 'orchestrator.commands' }); break;
      case 'sent': msgs.push({ e, from: 'orchestrator', to: svc, text: `${svc}.${e.action} #${e.attempt}`, queue: `${svc}.commands` }); break;
      case 'done': case 'refused': case 'failed': case 'compensated': case 'compensation_failed':
        msgs.push({ e, from: svc, to: 'orchestrator', text: `${e.event} (${label})`, queue: 'orchestrator.replies' }); break;
      case 'late_reply_ignored': msgs.push({ e, from: svc, to: 'orchestrator', text: 'late reply, ignored', queue: 'orchestrator.replies', dashed: true }); break;
      case 'succeeded': case 'rolled_back': case 'cancelled': case 'cancel_refused':
        msgs.push({ e, from: 'orchestrator', to: 'gateway', text: `outcome: ${e.event}`, queue: `gateway outcomes` }); break;
      default: msgs.push({ e, from: 'orchestrator', to: 'orchestrator', text: `${e.event}${svc ? ' ' + svc : ''}${e.detail ? ': ' + e.detail : ''}` });
    }
  }
  const width = actors.length * CW + 40, height = top + msgs.length * RH + 30;
  const cx = (a) => 20 + Math.max(0, actors.indexOf(a)) * CW + CW / 2;
  const root = svg('svg', { width, height, class: 'sequence', role: 'img', 'aria-label': 'the saga messages in order' });
  root.append(svg('defs', null, svg('marker', { id: 'seq-arrow', viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
    svg('path', { d: 'M0,0 L10,5 L0,10 z', fill: '#4b5563' }))));
  for (const a of actors) {
    root.append(svg('text', { x: cx(a), y: 16, 'text-anchor': 'middle', 'font-weight': 600 }, a),
      svg('line', { x1: cx(a), y1: 22, x2: cx(a), y2: height - 6, stroke: '#d9dde5', 'stroke-dasharray': '4 3' }));
  }
  msgs.forEach((m, i) => {
    const y = top + i * RH + 14;
    const g = svg('g', { class: 'msg', 'data-event': m.e.event, 'data-from': m.from, 'data-to': m.to });
    if (m.from === m.to) {
      g.append(svg('circle', { cx: cx(m.from), cy: y, r: 3, fill: COLORS[m.e.event] || '#333' }),
        svg('text', { x: cx(m.from) + 8, y: y + 4, fill: COLORS[m.e.event] || '#333' }, m.text));
    } else {
      const [x1, x2] = [cx(m.from), cx(m.to)];
      g.append(svg('line', { x1, y1: y, x2: x2 + (x2 > x1 ? -4 : 4), y2: y, stroke: COLORS[m.e.event] || '#4b5563',
        'stroke-dasharray': m.dashed ? '5 3' : null, 'marker-end': 'url(#seq-arrow)' }),
      svg('text', { x: (x1 + x2) / 2, y: y - 4, 'text-anchor': 'middle' }, m.text));
    }
    g.append(svg('title', null, `+${m.e.at_ms - v.created_at_ms} ms${m.queue ? ' via ' + m.queue : ''}${m.e.detail ? ': ' + m.e.detail : ''}`));
    root.append(g);
  });
  return root;
}

function historyTable(v) {
  return h('table', { class: 'history' },
    h('thead', null, h('tr', null, ['+ms', 'Step', 'Action', 'Attempt', 'Event', 'Detail', 'Queue', 'Trace'].map((t) => h('th', null, t)))),
    h('tbody', null, v.history.map((e) => {
      const queue = e.event === 'sent' ? `${e.step}.commands` : e.step ? 'orchestrator.replies' : 'orchestrator.commands';
      return h('tr', { 'data-event': e.event, 'data-step': e.step || 'saga' },
        h('td', null, e.at_ms - v.created_at_ms), h('td', null, e.step || 'saga'), h('td', null, e.action || ''),
        h('td', null, e.attempt), h('td', null, badge(e.event)), h('td', null, e.detail || ''),
        h('td', null, queueLink(queue)), h('td', null, traceLink(e.trace_id || v.trace_id)));
    })));
}

// ---- spaces and their chains ----------------------------------------------------------------

function spacesPage(main, params) {
  main.append(h('h1', null, S.overview.mode === 'events' ? 'Event chains' : 'Spaces'),
    h('p', { class: 'muted' }, 'Every request this gateway took, newest first; a space’s page rebuilds its chain from the services’ inboxes and outboxes.'));
  const q = h('input', { type: 'search', name: 'q', placeholder: 'space name, owner or id', size: 32, value: params.get('q') });
  main.append(h('form', { class: 'filters', onsubmit: (e) => { e.preventDefault(); go('/spaces', q.value.trim() ? new URLSearchParams({ q: q.value.trim() }) : null); } },
    h('label', null, 'Search', q), h('button', { type: 'submit' }, 'Search'), h('a', { href: '#/spaces' }, 'clear')));
  const list = h('div', { id: 'requests' });
  const pager = h('div', { class: 'pager' });
  main.append(list, pager);
  const query = new URLSearchParams();
  if (params.get('q')) query.set('q', params.get('q'));
  if (params.get('before')) query.set('before', params.get('before'));
  return poll(async () => {
    const r = await api('/console/api/requests?' + query);
    if (!r.ok) { replace(list, h('p', { class: 'msg err' }, r.body && r.body.error)); return; }
    replace(list, requestsTable(r.body.requests), r.body.requests.length ? null : h('p', { class: 'muted' }, 'No request matches.'));
    replace(pager, params.get('before') ? h('a', { href: '#/spaces' }, '⟵ newest') : null,
      r.body.next ? h('a', { href: '#/spaces?' + withParam(params, 'before', r.body.next) }, 'older ⟶') : null);
  }, params.get('before') ? 0 : 3000);
}

function outcomeReason(e) {
  if (typeof e === 'string') return e;
  return e.reason || e.error || e.message || JSON.stringify(e);
}

// What each link of a space's chain did: holds its row, was undone later, handled the event
// and stopped the chain (a refusal), or never saw it.
function linkState(l) {
  if (l.held_at_ms) return 'ok';
  if (l.undone.length) return 'undone';
  if (l.handled.length || l.waiting.length) return 'stopped';
  return 'absent';
}

function spacePage(main, id) {
  const head = h('div', { class: 'panel', id: 'space-head' });
  const chain = h('div', { class: 'panel', id: 'chain' });
  const verdict = h('div', { class: 'panel', id: 'verdict' });
  const events = h('div', { id: 'events' });
  main.append(h('h1', null, 'Space ', h('span', { class: 'mono' }, id)), head, h('h2', null, 'Chain'), chain, verdict,
    h('h2', null, 'Every message, in order'), events);
  return poll(async () => {
    const r = await api('/console/api/spaces/' + id);
    if (!r.ok) { replace(head, h('p', { class: 'msg err' }, r.body && r.body.error)); return; }
    const sp = r.body, req = sp.request;
    replace(head, req ? h('dl', { class: 'kv' },
      h('dt', null, 'Name'), h('dd', null, req.name), h('dt', null, 'Owner'), h('dd', null, req.owner),
      h('dt', null, 'Mode'), h('dd', null, req.mode), h('dt', null, 'Requested'), h('dd', null, when(req.requested_at_ms)),
      h('dt', null, 'Client told'), h('dd', null, req.told_status ?? 'nothing (no answer)'),
      h('dt', null, 'Outcome'), h('dd', null, req.outcome_status ?? 'none yet',
        req.outcome && req.outcome.error ? ` — ${outcomeReason(req.outcome.error)}` : ''),
      req.mode === 'workflow' && req.saga_id !== req.space_id ? [h('dt', null, 'Saga'), h('dd', null, h('a', { href: '#/saga/' + req.saga_id }, req.saga_id))] : null)
      : h('p', { class: 'muted' }, 'This gateway took no request for this space; the chain below is what the services hold.'));
    const states = sp.links.map(linkState);
    const items = [];
    sp.links.forEach((l, i) => {
      const st = states[i];
      const sent = l.handled.flatMap((m) => m.sent.map((s) => s.kind));
      if (i) items.push(h('span', { class: 'arrow' }, '→'));
      items.push(h('div', { class: 'link ' + st, 'data-service': l.service, 'data-state': st },
        h('b', null, l.service), ' ', badge(st),
        l.held_at_ms ? h('div', { class: 'muted' }, 'row written ' + when(l.held_at_ms)) : null,
        l.undone.map((u) => h('div', { class: 'undone-at' }, `undone ${when(u.at_ms)}`)),
        sent.length ? h('div', { class: 'muted' }, 'sent ' + [...new Set(sent)].join(', ')) : null,
        l.waiting.length ? h('div', { class: 'msg err' }, `${l.waiting.length} message(s) not yet published`) : null,
        h('div', null, queueLink(`${l.service}.${sp.mode === 'events' ? 'events' : 'commands'}`))));
    });
    replace(chain, h('div', { class: 'chain' }, items));
    const stopIdx = states.findIndex((s) => s === 'stopped' || s === 'absent');
    const undone = sp.links.filter((l) => l.undone.length);
    const complete = stopIdx < 0;
    main.dataset.chain = complete ? 'complete' : 'stopped';
    replace(verdict,
      h('p', { id: 'stopped-at', 'data-service': complete ? '' : sp.links[stopIdx].service },
        complete ? 'The chain went through every service.'
          : states[stopIdx] === 'stopped'
            ? `The chain stopped at ${sp.links[stopIdx].service}: it handled the event and went no further.`
            : `The chain stopped before ${sp.links[stopIdx].service}: no service after ${stopIdx ? sp.links[stopIdx - 1].service : 'the gateway'} got its event.`),
      h('p', { id: 'undone', 'data-services': undone.map((l) => l.service).join(' ') },
        undone.length ? `Undone later (a compensation, e.g. baton reconcile): ${undone.map((l) => `${l.service} at ${when(l.undone[0].at_ms)}`).join(', ')}.`
          : complete ? '' : 'Nothing was undone yet: what the chain left stays until baton reconcile runs.'));
    const all = sp.links.flatMap((l) => l.handled.map((m) => ({ service: l.service, m })).concat(l.waiting.map((w) => ({ service: l.service, w }))))
      .sort((a, b) => (a.m ? a.m.at_ms : a.w.at_ms || 0) - (b.m ? b.m.at_ms : b.w.at_ms || 0));
    replace(events, h('table', { class: 'events' },
      h('thead', null, h('tr', null, ['At', 'Service', 'Handled message', 'Sent', 'To'].map((t) => h('th', null, t)))),
      h('tbody', null, all.map(({ service, m, w }) => m
        ? h('tr', { 'data-service': service }, h('td', null, when(m.at_ms)), h('td', null, service), h('td', { class: 'mono' }, short(m.message_id)),
          h('td', null, m.sent.map((s) => h('div', null, s.kind, s.body && s.body.error ? ` (${s.body.error.reason || ''})` : ''))),
          h('td', null, m.sent.map((s) => h('div', { class: 'mono' }, `${s.exchange} ${s.routing_key}`))))
        : h('tr', { 'data-service': service, class: 'waiting' }, h('td', null, when(w.at_ms)), h('td', null, service), h('td', null, 'not yet published'),
          h('td', null, w.kind), h('td', { class: 'mono' }, `${w.exchange} ${w.routing_key}`))))));
  }, 3000);
}

// ---- health and comparison -------------------------------------------------------------------

function queuesOf(component) {
  const o = S.overview;
  if (component === 'orchestrator') return ['orchestrator.commands', 'orchestrator.replies'];
  if (component === 'gateway') return [`gateway.${o.instance}.${o.mode === 'events' ? 'events' : 'outcomes'}`];
  // In hybrid mode the email and the search index react to the saga's event.
  if (o.mode === 'hybrid' && ['notifier', 'search'].includes(component)) return [`${component}.followups`];
  if (o.services.includes(component)) return [`${component}.${o.mode === 'events' ? 'events' : 'commands'}`];
  return [];
}

function healthPage(main) {
  const broker = h('div', { id: 'instances' });
  const queues = h('div', { id: 'queues' });
  const box = h('div', { id: 'health' });
  main.append(h('h1', null, 'Health'),
    h('h2', null, 'Component instances'),
    h('p', { class: 'muted' }, 'Every component instance connected to the broker, in whatever process it runs, as RabbitMQ’s management API sees it: ready when its connection runs and it consumes its queues.'),
    broker, h('h2', null, 'Queues'), queues,
    h('h2', null, 'Checks of this gateway’s process'),
    h('p', { class: 'muted' }, 'Each component that runs in this process and its own checks (what /health/ready answers). Every gateway serves the console: open another one for its process.'),
    box);
  return poll(async () => {
    await loadOverview();
    const r = await api('/console/api/health');
    if (!r.ok) throw new Error('health: ' + r.status);
    renderBroker(broker, queues, r.body);
    renderProcess(box, r.body.process);
  }, 3000);
}

// The instances and queues the management API lists, or why it could not be read.
function renderBroker(broker, queues, b) {
  if (b.error) {
    replace(broker, h('p', { class: 'msg err', id: 'mgmt-error' }, `RabbitMQ’s management API at ${b.mgmt_url} could not be read: ${b.error}. Set BATON_MGMT_URL, BATON_MGMT_USER and BATON_MGMT_PASSWORD for the gateway (a user with the monitoring tag).`));
    replace(queues);
    return;
  }
  replace(broker, h('table', { class: 'instances' },
    h('thead', null, h('tr', null, ['Component', 'Instance', 'Ready', 'Connection', 'Consumes'].map((t) => h('th', null, t)))),
    h('tbody', null, b.instances.map((i) => h('tr', { 'data-component': i.component, 'data-instance': i.instance, 'data-ready': String(i.ready) },
      h('td', null, i.component), h('td', null, i.instance), h('td', null, badge(i.ready ? 'ok' : 'bad')),
      h('td', null, i.state), h('td', null, i.consuming.map((q) => h('div', null, queueLink(q)))))))),
  b.instances.length ? null : h('p', { class: 'msg err' }, 'No component is connected to the broker.'));
  replace(queues, h('table', { class: 'queues' },
    h('thead', null, h('tr', null, ['Queue', 'Ready', 'Unacked', 'Consumers'].map((t) => h('th', null, t)))),
    h('tbody', null, b.queues.map((q) => h('tr', { 'data-queue': q.name, 'data-ready': q.ready, 'data-unacked': q.unacked, 'data-consumers': q.consumers,
      class: q.name.endsWith('.dlq') && q.ready ? 'dead' : null },
      h('td', null, queueLink(q.name)), h('td', null, q.ready), h('td', null, q.unacked), h('td', null, q.consumers))))));
}

// This process's components and their checks.
function renderProcess(box, rep) {
  const byComponent = {};
  for (const c of rep.checks) (byComponent[c.component] = byComponent[c.component] || []).push(c);
  replace(box, h('p', null, 'ready ', badge(rep.ready ? 'ok' : 'bad'), ' live ', badge(rep.live ? 'ok' : 'bad')),
    h('table', { class: 'health' },
      h('thead', null, h('tr', null, ['Component', 'Ready', 'Checks', 'Queues'].map((t) => h('th', null, t)))),
      h('tbody', null, Object.entries(byComponent).map(([comp, checks]) => h('tr', { 'data-component': comp },
        h('td', null, comp), h('td', null, badge(checks.every((c) => c.ok) ? 'ok' : 'bad')),
        h('td', null, checks.map((c) => h('div', null, badge(c.ok ? 'ok' : 'bad'), ` ${c.kind}: ${c.check}`, c.reason ? ` — ${c.reason}` : ''))),
        h('td', null, queuesOf(comp).map((q) => h('div', null, queueLink(q)))))))));
}

function comparePage(main) {
  S.seq++;
  main.append(h('h1', null, 'Comparison'),
    h('p', { class: 'muted' }, 'The latest baton compare report: the same load and faults through each mode, side by side.'),
    h('iframe', { src: '/console/compare', title: 'the latest comparison' }));
}

window.addEventListener('hashchange', route);
route();
