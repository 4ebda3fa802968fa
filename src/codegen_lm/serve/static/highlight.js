// A small Python syntax highlighter: one left-to-right scan with a combined regular expression.
// highlightPython(text) returns HTML with <span class="tok-..."> around comments, strings, keywords,
// builtins, numbers, decorators and the names after def/class; everything else is escaped text.
(function () {
  "use strict";
  const KEYWORDS = new Set(("False None True and as assert async await break class continue def del elif else " +
    "except finally for from global if import in is lambda nonlocal not or pass raise return try while with " +
    "yield match case").split(" "));
  const BUILTINS = new Set(("abs all any bool dict enumerate filter float format int isinstance len list map " +
    "max min next object open print range repr reversed round set sorted str sum super tuple type zip self " +
    "np").split(" "));
  const TOKEN = new RegExp([
    "(#[^\\n]*)",                                                        // 1 comment
    "((?:[rRbBuUfF]{1,2})?(?:'''[\\s\\S]*?(?:'''|$)|\"\"\"[\\s\\S]*?(?:\"\"\"|$)|'(?:\\\\.|[^'\\\\\\n])*'?|\"(?:\\\\.|[^\"\\\\\\n])*\"?))", // 2 string
    "(@[A-Za-z_][\\w.]*)",                                               // 3 decorator
    "(\\b(?:0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+|\\d[\\d_]*\\.?\\d*(?:[eE][+-]?\\d+)?j?|\\.\\d+(?:[eE][+-]?\\d+)?j?)\\b)", // 4 number
    "([A-Za-z_]\\w*)",                                                   // 5 name
  ].join("|"), "g");

  function escape(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  function span(cls, s) {
    return '<span class="tok-' + cls + '">' + escape(s) + "</span>";
  }

  function highlightPython(text) {
    let out = "", last = 0, m, afterDef = false;
    TOKEN.lastIndex = 0;
    while ((m = TOKEN.exec(text)) !== null) {
      if (m[0] === "") { TOKEN.lastIndex++; continue; }
      const gap = text.slice(last, m.index);
      out += escape(gap);
      if (gap.trim() !== "") afterDef = false;
      if (m[1] !== undefined) out += span("comment", m[1]);
      else if (m[2] !== undefined) out += span("string", m[2]);
      else if (m[3] !== undefined) out += span("decorator", m[3]);
      else if (m[4] !== undefined) out += span("number", m[4]);
      else {
        const w = m[5];
        if (afterDef) out += span("defname", w);
        else if (KEYWORDS.has(w)) out += span("keyword", w);
        else if (BUILTINS.has(w)) out += span("builtin", w);
        else out += escape(w);
        afterDef = w === "def" || w === "class";
        last = TOKEN.lastIndex;
        continue;
      }
      afterDef = false;
      last = TOKEN.lastIndex;
    }
    return out + escape(text.slice(last));
  }

  window.highlightPython = highlightPython;
})();
