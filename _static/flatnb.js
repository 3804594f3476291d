// flatnb: every figure in a chapter's output opens full size in a new tab when clicked (issue 16).
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("div.cell_output img").forEach(function (img) {
    if (img.closest("a")) return;
    var link = document.createElement("a");
    link.href = img.currentSrc || img.src;
    link.target = "_blank";
    link.rel = "noopener";
    link.className = "flatnb-full-size";
    link.title = "open the figure full size";
    img.parentNode.insertBefore(link, img);
    link.appendChild(img);
  });
});
