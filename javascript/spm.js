// SPM in the browser (A1111 1.10 / Gradio 3.41 and Forge / Gradio 4.40): the WebUI injects every extension's
// javascript/*.js into the page head.
//
// * `<spm:` completion in the txt2img / img2img / hires-fix prompt boxes, with the names of GET ./spm/v1/names
//   (or, without the route, the names the panel lists);
// * fresh lists: when the folder changed (the route's `signature`), the panel's list is refreshed (its 🔄 button)
//   and so are the Extra Networks SPM cards (their stamp, written by spm/webui/networks.py, says which listing
//   they show) — checked on page load, on a tab switch, when the window regains focus and when `<spm:` is typed;
// * tooltips on the panel's controls.
//
// Everything is optional: no panel, no cards, no route, no WebUI helpers (gradioApp, onUiLoaded, ...) — nothing
// happens and nothing is thrown.
(function() {
    "use strict";

    var ROUTE = "./spm/v1/names";
    var TABS = ["txt2img", "img2img"];
    var PANEL = "_spm_concept_erasing_";
    var TITLES = {
        spm_enable: "Apply the membranes ticked below to every image of this generation. A <spm:name:weight> tag " +
            "in a prompt applies its membrane without this switch.",
        spm_membranes: "The membranes in the SPM folder (models/spm, or --spm-dir). The list is rescanned on every " +
            "page load and when the folder changes.",
        spm_refresh: "Rescan the membrane folder now",
        spm_weights: "name:weight for each membrane, separated by commas (1.0 = trained strength, 0 = off). A " +
            "<spm:name:weight> tag in a prompt overrides its membrane's weight here.",
        spm_metric: "Facilitated Transport: each membrane acts on a prompt only as far as the prompt resembles the " +
            "membrane's concepts. 'response' also asks the model whether the prompt draws a concept, so prompts " +
            "that avoid its words are caught too (slower: the first generation with a membrane builds its probes). " +
            "'off' applies the weight alone, to every prompt.",
        spm_factor: "Multiplies every membrane's strength (weight × factor × transport score).",
        spm_explain: "Show, per membrane and concept, the transport score this prompt gets, the window of the " +
            "prompt that matched and the calibration behind it (computed with the loaded model's text encoder)."
    };
    var known = {names: null, descriptions: {}, signature: null, defaultWeight: null};
    var pending = null, queued = null;
    var cardsAsked = {};

    function root() {
        try {
            if (typeof gradioApp === "function") {
                var app = gradioApp();
                if (app) return app;
            }
        } catch (e) { /* not a WebUI page */ }
        var el = document.querySelector("gradio-app");
        return (el && el.shadowRoot) || document;
    }

    function byId(id) {
        var r = root();
        var el = r.getElementById ? r.getElementById(id) : r.querySelector("#" + CSS.escape(id));
        return el || document.getElementById(id);
    }

    function panelId(tab, suffix) {
        return "script_" + tab + PANEL + suffix;
    }

    // --- the listing ---------------------------------------------------------------------------------------
    function request() {
        if (typeof fetch !== "function") return Promise.resolve(null);
        return fetch(ROUTE, {cache: "no-store", credentials: "same-origin"})
            .then(function(r) {
                return r.ok ? r.json() : null;
            })
            .then(function(d) {
                if (d && Array.isArray(d.names)) {
                    known.names = d.names.map(String);
                    known.descriptions = d.descriptions || {};
                    known.signature = d.signature || null;
                    known.defaultWeight = typeof d.default_weight === "number" ? d.default_weight : null;
                }
                return d;
            })
            .catch(function() {
                return null;
            });
    }

    // One request at a time; a call while one is in flight gets one more request after it (the folder may
    // have changed since the first was sent), shared by every caller in the meantime.
    function fetchNames() {
        if (!pending) {
            pending = request().then(function(d) {
                pending = null;
                return d;
            });
            return pending;
        }
        if (!queued) {
            queued = pending.then(function() {
                queued = null;
                return fetchNames();
            });
        }
        return queued;
    }

    function panelNames(tab) {
        var el = byId(panelId(tab, "spm_membranes"));
        if (!el) return null;
        return Array.prototype.map.call(el.querySelectorAll("input[type=checkbox]"), function(input) {
            var label = input.closest("label");
            return (label ? label.textContent : input.value || "").trim();
        });
    }

    function sameNames(a, b) {
        if (a.length !== b.length) return false;
        var x = a.slice().sort(), y = b.slice().sort();
        for (var i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
        return true;
    }

    function clickElement(el) {
        if (!el) return false;
        var button = el.tagName === "BUTTON" ? el : el.querySelector("button") || el;
        button.dispatchEvent(new MouseEvent("click", {bubbles: true, cancelable: true}));
        return true;
    }

    function syncPanels() {
        if (!known.names) return;
        TABS.forEach(function(tab) {
            var shown = panelNames(tab);
            if (shown !== null && !sameNames(shown, known.names)) clickElement(byId(panelId(tab, "spm_refresh")));
        });
    }

    function syncCards() {
        if (!known.signature) return;
        TABS.forEach(function(tab) {
            var pane = byId(tab + "_spm_cards_html");
            var stamp = pane && pane.querySelector(".spm-cards-stamp");
            var shown = stamp && stamp.getAttribute("data-spm-signature");
            if (!shown || shown === "loading" || shown === known.signature) return;
            var ask = shown + ">" + known.signature;
            if (cardsAsked[tab] === ask) return; // that refresh is on its way
            if (clickElement(byId(tab + "_spm_extra_refresh_internal"))) cardsAsked[tab] = ask;
        });
    }

    function sync() {
        return fetchNames().then(function() {
            syncPanels();
            syncCards();
        });
    }

    // --- tooltips ------------------------------------------------------------------------------------------
    function applyTitles() {
        TABS.forEach(function(tab) {
            Object.keys(TITLES).forEach(function(suffix) {
                var el = byId(panelId(tab, suffix));
                if (!el) return;
                if (suffix === "spm_enable") el = el.querySelector(".label-wrap") || el;
                if (el.title !== TITLES[suffix]) el.title = TITLES[suffix];
            });
        });
    }

    // --- <spm: completion ----------------------------------------------------------------------------------
    var TAG_AT_CARET = /<spm:([^:<>,]*)$/i;
    var box = null;
    var session = null; // {area, start, query, items, index}

    // the prompts whose tags SPM reads (a tag never acts on negative rows, so not the negative prompts)
    var PROMPTS = "#txt2img_prompt, #img2img_prompt, #hires_prompt";

    function promptArea(el) {
        if (!el || el.tagName !== "TEXTAREA" || !el.closest) return false;
        return !!el.closest(PROMPTS);
    }

    function formatWeight(w) {
        w = Number(w);
        if (!isFinite(w)) w = 1;
        var s = String(Math.round(w * 1e4) / 1e4);
        return /[.e]/.test(s) ? s : s + ".0";
    }

    function defaultWeight() {
        if (typeof opts === "object" && opts && opts.spm_default_weight !== undefined) return opts.spm_default_weight;
        return known.defaultWeight !== null ? known.defaultWeight : 1;
    }

    function candidates(query) {
        var names = known.names;
        if (!names) {
            var seen = {};
            names = [];
            TABS.forEach(function(tab) {
                (panelNames(tab) || []).forEach(function(n) {
                    if (!seen[n]) names.push(n);
                    seen[n] = true;
                });
            });
        }
        var q = query.toLowerCase();
        var starts = [], contains = [];
        names.forEach(function(n) {
            var l = n.toLowerCase();
            var stem = l.slice(l.lastIndexOf("/") + 1);
            if (l.indexOf(q) === 0 || stem.indexOf(q) === 0) starts.push(n);
            else if (l.indexOf(q) > 0) contains.push(n);
        });
        return starts.concat(contains).slice(0, 20);
    }

    function closeBox() {
        session = null;
        if (box) box.style.display = "none";
    }

    function renderBox() {
        if (!session || !session.items.length) {
            closeBox();
            return;
        }
        if (!box) {
            box = document.createElement("div");
            box.className = "spm-complete";
            box.id = "spm_complete";
            box.setAttribute("role", "listbox");
            box.addEventListener("mousedown", function(e) {
                var item = e.target.closest && e.target.closest(".spm-complete-item");
                if (!item || !session) return;
                e.preventDefault(); // keep the focus in the prompt
                session.index = Number(item.getAttribute("data-index"));
                accept();
            });
            document.body.appendChild(box);
        }
        box.innerHTML = "";
        session.items.forEach(function(name, i) {
            var item = document.createElement("div");
            item.className = "spm-complete-item" + (i === session.index ? " selected" : "");
            item.setAttribute("role", "option");
            item.setAttribute("data-index", String(i));
            item.setAttribute("data-name", name);
            var label = document.createElement("span");
            label.className = "spm-complete-name";
            label.textContent = name;
            item.appendChild(label);
            var description = known.descriptions[name];
            if (description) {
                var info = document.createElement("span");
                info.className = "spm-complete-info";
                info.textContent = description;
                item.appendChild(info);
            }
            box.appendChild(item);
        });
        var r = session.area.getBoundingClientRect();
        box.style.left = Math.max(0, r.left) + "px";
        box.style.top = Math.min(r.bottom, window.innerHeight - 40) + "px";
        box.style.minWidth = Math.min(r.width, 360) + "px";
        box.style.display = "block";
    }

    function changed(area) {
        if (typeof updateInput === "function") {
            updateInput(area); // the WebUI's helper: tells Gradio the value changed
        } else {
            area.dispatchEvent(new Event("input", {bubbles: true}));
        }
    }

    function accept() {
        if (!session) return;
        var name = session.items[session.index];
        var area = session.area;
        var value = area.value;
        var caret = area.selectionStart;
        var before = value.slice(0, session.start) + name;
        var after = value.slice(caret);
        var rest = /^[^:<>,]*(?=[:>])/.exec(after); // editing the name of a tag that is already closed
        if (rest) {
            after = after.slice(rest[0].length);
        } else {
            before += ":" + formatWeight(defaultWeight()) + ">";
        }
        closeBox();
        area.value = before + after;
        area.selectionStart = area.selectionEnd = before.length;
        changed(area);
    }

    function onInput(area) {
        var m = TAG_AT_CARET.exec(area.value.slice(0, area.selectionStart));
        if (!m) {
            closeBox();
            return;
        }
        var fresh = !session || session.area !== area;
        session = {area: area, start: area.selectionStart - m[1].length, query: m[1], items: candidates(m[1]), index: 0};
        renderBox();
        if (fresh) {
            // a new completion: make sure the names are those of now (and the lists, while at it)
            sync().then(function() {
                if (session && session.area === area) {
                    session.items = candidates(session.query);
                    session.index = Math.min(session.index, Math.max(0, session.items.length - 1));
                    renderBox();
                }
            });
        }
    }

    function target(e) {
        return e.composedPath ? e.composedPath()[0] : e.target;
    }

    document.addEventListener("input", function(e) {
        var el = target(e);
        if (promptArea(el)) onInput(el);
    }, true);

    document.addEventListener("keydown", function(e) {
        if (!session || target(e) !== session.area) return;
        var n = session.items.length;
        if (e.key === "ArrowDown" || e.key === "ArrowUp") {
            session.index = (session.index + (e.key === "ArrowDown" ? 1 : n - 1)) % n;
            renderBox();
        } else if (e.key === "Enter" || e.key === "Tab") {
            accept();
        } else if (e.key === "Escape") {
            closeBox();
        } else {
            return;
        }
        e.preventDefault();
        e.stopPropagation(); // Enter must not reach the WebUI's Ctrl+Enter / Gradio's submit handlers
    }, true);

    document.addEventListener("focusout", function(e) {
        if (session && target(e) === session.area) closeBox();
    }, true);

    // --- wiring --------------------------------------------------------------------------------------------
    function onLoaded() {
        applyTitles();
        sync();
    }

    function onUpdated() {
        applyTitles();
        syncCards();
    }

    if (typeof onUiLoaded === "function" && typeof onAfterUiUpdate === "function") {
        onUiLoaded(onLoaded);
        onAfterUiUpdate(onUpdated);
        if (typeof onUiTabChange === "function") onUiTabChange(sync);
    } else {
        // no WebUI helpers: watch the page ourselves (the panel or the prompt appearing = loaded)
        var loaded = false, timer = null;
        new MutationObserver(function() {
            if (!loaded && (byId("txt2img_prompt") || byId(panelId("txt2img", "spm_membranes")))) {
                loaded = true;
                onLoaded();
            }
            clearTimeout(timer);
            timer = setTimeout(onUpdated, 200);
        }).observe(document, {childList: true, subtree: true});
    }
    window.addEventListener("focus", function() {
        sync();
    });

    window.spmWebui = {sync: sync, names: function() {
        return known.names;
    }, formatWeight: formatWeight};
})();
