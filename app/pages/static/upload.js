/* The upload form checks each chosen file against the server's per-file limit before sending anything:
   the server refuses a body over the limit before reading it, and a browser still busy sending a large
   upload often shows that as a dropped connection rather than as the server's answer. A static file, so
   the pages' Content-Security-Policy can forbid inline script. */
(function () {
  "use strict";
  var form = document.querySelector("form[data-max-upload-bytes]");
  if (!form) { return; }
  var limit = Number(form.getAttribute("data-max-upload-bytes"));
  var box = document.getElementById("size-error");
  var text = box ? box.querySelector("[data-field=size-error]") : null;

  function mb(n) { return (n / 1048576).toFixed(n < 10485760 ? 1 : 0) + " MB"; }

  form.addEventListener("submit", function (event) {
    if (!(limit > 0)) { return; }
    var inputs = form.querySelectorAll("input[type=file]");
    for (var i = 0; i < inputs.length; i++) {
      var files = inputs[i].files || [];
      for (var j = 0; j < files.length; j++) {
        if (files[j].size > limit) {
          event.preventDefault();
          if (box && text) {
            text.textContent = files[j].name + " is " + mb(files[j].size) + "; this server takes files of at most " +
              mb(limit) + " (its LOWBIT_MAX_UPLOAD_BYTES). Choose a smaller file.";
            box.hidden = false;
            box.scrollIntoView({block: "nearest"});
          }
          return;
        }
      }
    }
    if (box) { box.hidden = true; }
  });
}());
