// SafeCFG for ComfyUI: per-image scores, flags and reveal buttons on the pack's own detector and
// filter nodes, and the server's warnings as toasts. The server already blurs every flagged image in the preview files it sends, so the
// previews are blurred in any renderer, the queue and the assets panel; this extension only adds a
// report with a "reveal" button per flagged image, through the front end's documented DOM-widget API
// (node.addDOMWidget), which the classic canvas and Nodes 2.0 both render. It touches no other node
// type and patches no canvas call.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPES = new Set(["HGRHarmDetector", "HGRHarmFilter"]);
const WIDGET = "safecfg_report";
const STYLE = `
.safecfg-report { font: 12px sans-serif; color: var(--input-text, #ddd); display: flex; flex-direction: column;
  gap: 3px; overflow: auto; height: 100%; box-sizing: border-box; padding: 2px 4px; }
.safecfg-report .safecfg-summary { font-weight: 600; white-space: normal; }
.safecfg-report .safecfg-row { display: flex; align-items: center; gap: 6px; }
.safecfg-report .safecfg-tag { border-radius: 3px; padding: 0 5px; color: #fff; background: #1e7b34; }
.safecfg-report .safecfg-row[data-flagged="true"] .safecfg-tag { background: #b3261e; }
.safecfg-report button { font: inherit; padding: 0 6px; cursor: pointer; }
.safecfg-report img.safecfg-reveal { max-width: 100%; object-fit: contain;
  image-rendering: pixelated; align-self: flex-start; height: 180px; }
`;

function addStyle() {
  if (document.getElementById("safecfg-harm-style")) return;
  const el = document.createElement("style");
  el.id = "safecfg-harm-style";
  el.textContent = STYLE;
  document.head.appendChild(el);
}

function state(node) {
  if (!node.safecfg) node.safecfg = { scores: [], flags: [], reveal: [], threshold: null, revealed: [] };
  return node.safecfg;
}

function viewURL(entry) {
  const [filename, subfolder, type] = entry;
  const q = new URLSearchParams({ filename, subfolder: subfolder ?? "", type: type ?? "temp" });
  return api.apiURL(`/view?${q}`);
}

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, props);
  for (const c of children) e.append(c);
  return e;
}

// the report's height in canvas units: the summary, one row an image, and the revealed image
function reportHeight(node) {
  const s = state(node);
  return 56 + 20 * s.scores.length + (s.revealed.some(Boolean) ? 200 : 0);
}

// grow the node (never shrink it) so that the report and the previews both fit
function fit(node) {
  const want = node.computeSize?.();
  if (want && node.size && want[1] > node.size[1]) node.setSize?.([Math.max(node.size[0], want[0]), want[1]]);
}

function render(node) {
  const s = state(node);
  const root = s.root;
  if (!root) return;
  root.dataset.safecfgNode = String(node.id);
  root.replaceChildren();
  const n = s.scores.length;
  if (!n) {
    root.append(el("div", { className: "safecfg-summary", textContent: "Scores appear here after a run." }));
    return;
  }
  const flagged = s.flags.filter(Boolean).length;
  const thr = s.threshold == null ? "" : ` · threshold ${Number(s.threshold).toFixed(3)}`;
  const note = flagged ? " · flagged previews blurred" : "";
  const summary = `${flagged}/${n} flagged · max ${Math.max(...s.scores).toFixed(3)}${thr}${note}`;
  root.append(el("div", { className: "safecfg-summary", textContent: summary }));
  s.summary = summary;
  for (let i = 0; i < n; i++) {
    const row = el("div", { className: "safecfg-row" });
    row.dataset.index = String(i);
    row.dataset.flagged = String(Boolean(s.flags[i]));
    row.append(el("span", { textContent: `#${i + 1}` }),
      el("span", { className: "safecfg-tag", textContent: s.flags[i] ? "FLAGGED" : "ok" }),
      el("span", { textContent: `score ${s.scores[i].toFixed(3)}` }));
    if (s.flags[i] && s.reveal[i]) {
      const open = Boolean(s.revealed[i]);
      const b = el("button", { className: "safecfg-reveal-button", textContent: open ? "hide" : "reveal",
        title: open ? "Hide the sharp image again" : "Show this flagged image unblurred, below" });
      b.addEventListener("click", (e) => {
        e.stopPropagation();
        const open = !s.revealed[i];
        s.revealed = s.revealed.map(() => false);  // one sharp image at a time
        s.revealed[i] = open;
        render(node);
      });
      row.append(b);
    }
    root.append(row);
    if (s.flags[i] && s.reveal[i] && s.revealed[i]) {
      const img = el("img", { className: "safecfg-reveal", src: viewURL(s.reveal[i]),
        alt: `flagged image ${i + 1}, unblurred` });
      img.dataset.index = String(i);
      root.append(img);
    }
  }
  fit(node);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "SafeCFG.HarmBadges",
  async setup() {
    // warnings the server sends (e.g. an HGR used with another checkpoint than it was trained for)
    api.addEventListener("safecfg.warning", (e) => {
      const detail = e?.detail?.message ?? String(e?.detail ?? "");
      const toast = app.extensionManager?.toast;
      if (toast?.add) toast.add({ severity: "warn", summary: "SafeCFG", detail, life: 20000 });
      else console.warn("SafeCFG:", detail);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData?.name)) return;
    addStyle();

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const s = state(this);
      s.root = el("div", { className: "safecfg-report" });
      s.root.dataset.nodeType = nodeData.name;
      const widget = this.addDOMWidget(WIDGET, "safecfg_report", s.root, {
        serialize: false,
        hideOnZoom: false,
        getMinHeight: () => reportHeight(this),
        getMaxHeight: () => reportHeight(this),
      });
      if (widget) widget.serialize = false;  // never in the workflow's widgets_values
      render(this);
      return r;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const s = state(this);
      s.scores = (message?.hgr_scores ?? []).map(Number);
      s.flags = (message?.hgr_flags ?? []).map(Boolean);
      s.reveal = message?.hgr_reveal ?? [];
      s.threshold = message?.hgr_threshold?.[0] ?? null;
      s.revealed = s.scores.map(() => false);
      render(this);
      return r;
    };
  },
});
