// SafeCFG for ComfyUI: score badges and blurred, click-to-reveal previews on the pack's own
// detector and filter nodes. Touches no other node type.
import { app } from "../../scripts/app.js";

const NODE_TYPES = new Set(["HGRHarmDetector", "HGRHarmFilter"]);
const PREVIEW_WIDGET = "$$canvas-image-preview";
const BLUR = "blur(14px)";

function state(node) {
  if (!node.safecfg) node.safecfg = { scores: [], flags: [], threshold: null, revealed: false, blurredDraws: 0 };
  return node.safecfg;
}

// Which batch image an <img> being drawn is: by identity in node.imgs, else by the preview file
// name in its URL (the front end may draw copies of the preview images).
function imageIndexOf(node, img) {
  const i = Array.isArray(node.imgs) ? node.imgs.indexOf(img) : -1;
  if (i >= 0) return i;
  const src = img && typeof img.src === "string" ? decodeURIComponent(img.src) : "";
  const files = state(node).files;
  if (!src || !files) return -1;
  return files.findIndex((f) => f && src.includes(`filename=${f}`));
}

// Flagged images are drawn blurred (unless revealed) by wrapping the canvas context's drawImage
// while, and only while, this node's own image-preview widget draws.
function installBlur(node, ctx) {
  const s = state(node);
  if (s.revealed || !s.flags.some(Boolean) || ctx.__safecfgOriginalDrawImage) return;
  const original = ctx.drawImage;
  ctx.__safecfgOriginalDrawImage = original;
  ctx.drawImage = function (img, ...rest) {
    const i = imageIndexOf(node, img);
    if (i >= 0 && s.flags[i]) {
      const previous = this.filter;
      this.filter = previous && previous !== "none" ? `${previous} ${BLUR}` : BLUR;
      s.blurredDraws += 1;
      try {
        return original.call(this, img, ...rest);
      } finally {
        this.filter = previous;
      }
    }
    return original.call(this, img, ...rest);
  };
}

function removeBlur(ctx) {
  if (ctx.__safecfgOriginalDrawImage) {
    ctx.drawImage = ctx.__safecfgOriginalDrawImage;
    delete ctx.__safecfgOriginalDrawImage;
  }
}

function wrapPreview(node) {
  const w = node.widgets?.find((x) => x.name === PREVIEW_WIDGET);
  if (!w || w.__safecfgWrapped) return;
  // the canvas draws widgets through drawWidget (current front ends) or draw (older ones)
  for (const method of ["drawWidget", "draw"]) {
    const original = w[method];
    if (typeof original !== "function") continue;
    w[method] = function (ctx, ...rest) {
      installBlur(node, ctx);
      try {
        return original.call(this, ctx, ...rest);
      } finally {
        removeBlur(ctx);
      }
    };
  }
  w.__safecfgWrapped = true;
}

function badgeText(node) {
  const s = state(node);
  if (!s.scores.length) return null;
  const flagged = s.flags.filter(Boolean).length;
  const idx = node.imageIndex;
  if (idx != null && idx >= 0 && idx < s.scores.length) {
    return `${s.flags[idx] ? "FLAGGED" : "ok"} · score ${s.scores[idx].toFixed(3)}`;
  }
  const max = Math.max(...s.scores);
  return `${flagged}/${s.scores.length} flagged · max ${max.toFixed(3)}`;
}

function drawBadge(node, ctx) {
  const text = badgeText(node);
  if (!text) return;
  const s = state(node);
  const flagged = s.flags.some(Boolean);
  ctx.save();
  ctx.font = "12px sans-serif";
  const w = ctx.measureText(text).width + 12;
  const x = node.size[0] - w - 6;
  const y = 4;
  ctx.fillStyle = flagged ? "#b3261e" : "#1e7b34";
  ctx.beginPath();
  ctx.roundRect ? ctx.roundRect(x, y, w, 18, 4) : ctx.rect(x, y, w, 18);
  ctx.fill();
  ctx.fillStyle = "#fff";
  ctx.textBaseline = "middle";
  ctx.fillText(text, x + 6, y + 9);
  if (flagged && !s.revealed) {
    ctx.fillStyle = "#ddd";
    ctx.fillText("flagged previews blurred: click to reveal", 8, node.size[1] - 8);
  }
  ctx.restore();
  s.badge = text;
}

app.registerExtension({
  name: "SafeCFG.HarmBadges",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData?.name)) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const s = state(this);
      s.scores = (message?.hgr_scores ?? []).map(Number);
      s.flags = (message?.hgr_flags ?? []).map(Boolean);
      s.threshold = message?.hgr_threshold?.[0] ?? null;
      s.files = (message?.images ?? []).map((im) => im?.filename ?? null);
      s.revealed = false;
      this.setDirtyCanvas?.(true, true);
      return r;
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      wrapPreview(this);  // runs before the widgets are drawn, every frame
      if (!this.flags?.collapsed) drawBadge(this, ctx);
      return r;
    };

    const onMouseDown = nodeType.prototype.onMouseDown;
    nodeType.prototype.onMouseDown = function (e, pos) {
      const s = state(this);
      const preview = this.widgets?.find((w) => w.name === PREVIEW_WIDGET);
      const top = preview?.y ?? preview?.last_y ?? 0;
      if (s.flags.some(Boolean) && !s.revealed && pos && pos[1] >= top && this.imgs?.length) {
        s.revealed = true;
        this.setDirtyCanvas?.(true, true);
        return true;
      }
      return onMouseDown?.apply(this, arguments);
    };
  },
});
