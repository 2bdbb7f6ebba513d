// The page: subscribe to the orders channel, then load the current orders, then apply events.
// Subscribing first means no event is missed between the load and the subscription; applying an
// event only when its version is newer makes a late or repeated event harmless.
"use strict";

const orders = new Map(); // id -> the newest order data seen
const tbody = document.getElementById("orders");
const feed = document.getElementById("feed");
const result = document.getElementById("result");
const failBox = document.getElementById("fail");

function apply(order) {
  const known = orders.get(order.id);
  if (known && known.version >= order.version) return;
  orders.set(order.id, order);
  render(order);
}

function render(order) {
  let row = tbody.querySelector(`tr[data-order-id="${order.id}"]`);
  if (!row) {
    row = document.createElement("tr");
    row.dataset.orderId = order.id;
    for (let i = 0; i < 5; i++) row.appendChild(document.createElement("td"));
    const ship = document.createElement("button");
    ship.textContent = "Ship";
    ship.className = "ship";
    ship.addEventListener("click", () => send(`/api/orders/${order.id}/ship`));
    row.cells[4].appendChild(ship);
    tbody.appendChild(row);
    [...tbody.rows]
      .sort((a, b) => a.dataset.orderId - b.dataset.orderId)
      .forEach((r) => tbody.appendChild(r));
  }
  row.cells[0].textContent = order.id;
  row.cells[1].textContent = order.customer;
  row.cells[2].textContent = order.item;
  row.cells[3].textContent = order.status;
  row.dataset.status = order.status;
  row.cells[4].firstChild.disabled = order.status === "shipped";
}

function received(eventName, order) {
  const line = document.createElement("li");
  line.dataset.event = eventName;
  line.dataset.orderId = order.id;
  line.textContent = `${new Date().toLocaleTimeString()} ${eventName} ${JSON.stringify(order)}`;
  feed.prepend(line);
  apply(order);
}

async function send(path, body) {
  const url = failBox.checked ? `${path}?fail_after_enqueue=true` : path;
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = await response.json();
  if (response.ok && body !== undefined) document.getElementById("new-order").reset();
  result.dataset.ok = String(response.ok);
  result.textContent = response.ok
    ? `${response.status}: committed; the event will arrive once the worker publishes it`
    : `${response.status}: ${typeof answer.detail === "string" ? answer.detail : JSON.stringify(answer.detail)}`;
}

document.getElementById("new-order").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  send("/api/orders", { customer: form.customer.value, item: form.item.value });
});

async function start() {
  const config = await (await fetch("/api/config")).json();
  const pusher = new Pusher(config.key, {
    wsHost: config.wsHost,
    wsPort: config.wsPort,
    wssPort: config.wsPort,
    forceTLS: config.forceTLS,
    enabledTransports: ["ws", "wss"],
    cluster: "", // required by pusher-js 8, unused when wsHost is given
  });
  const state = document.getElementById("connection");
  pusher.connection.bind("state_change", ({ current }) => {
    state.textContent = current;
    state.dataset.state = current;
  });
  const channel = pusher.subscribe(config.channel);
  channel.bind("order-placed", (order) => received("order-placed", order));
  channel.bind("order-shipped", (order) => received("order-shipped", order));
  channel.bind("pusher:subscription_succeeded", async () => {
    for (const order of await (await fetch("/api/orders")).json()) apply(order);
    document.body.dataset.subscribed = "true";
  });
}

start();
