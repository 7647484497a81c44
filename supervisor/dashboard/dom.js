// Building the dashboard's page safely, for app.js and workflow.js (loaded before both):
// every value goes in as a text node or an attribute value, never parsed as HTML, so a
// payload holding <script> stays text.
"use strict";

window.taskvisorDom = Object.freeze({
  // An HTML element with attributes ("class", "onclick" as a listener; null/undefined
  // skipped) and children (nodes, or anything else as text).
  el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key === "onclick") node.addEventListener("click", value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  },

  // An SVG element, the same way.
  svg(tag, attrs, ...children) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    return node;
  },
});
