#!/usr/bin/env bash
# The seed lab against a running mall (scripts/up.sh): list products, order one TV and watch
# stock go 10 → 9 in products and in orders' replica, cancel it (stock back), then order 100
# TVs and watch the rollback. Prints each request, each response and the orders' timelines.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ORDERS="${ORDERS_URL:-http://127.0.0.1:8081}"
PRODUCTS="${PRODUCTS_URL:-http://127.0.0.1:8085}"
DELIVERY="${DELIVERY_URL:-http://127.0.0.1:8082}"

pretty() { if command -v jq >/dev/null; then jq .; else cat; echo; fi; }

# req METHOD URL [JSON]: prints the request and the pretty response; the body goes to $BODY.
req() {
  local method="$1" url="$2" data="${3:-}"
  printf '\n\033[36m$ curl -X %s %s%s\033[0m\n' "$method" "$url" "${data:+ -d '$data'}"
  if [[ -n "$data" ]]; then
    BODY="$(curl -sS -X "$method" "$url" -H 'Content-Type: application/json' -d "$data")"
  else
    BODY="$(curl -sS -X "$method" "$url")"
  fi
  printf '%s' "$BODY" | pretty
}

field() { printf '%s' "$BODY" | jq -r "$1"; }

# wait_for URL JQ-FILTER EXPECTED: polls until the filter yields EXPECTED (10 s at most).
wait_for() {
  local got=""
  for _ in $(seq 1 100); do
    got="$(curl -sS "$1" | jq -r "$2")"
    [[ "$got" == "$3" ]] && return 0
    sleep 0.1
  done
  echo "gave up waiting: $1 $2 is $got, expected $3" >&2
  return 1
}

command -v jq >/dev/null || die "demo.sh needs jq (apt-get install jq)"
curl -sf "$ORDERS/health" >/dev/null || die "orders is not answering at $ORDERS; run scripts/up.sh first"

say "1. The catalog (products) and orders' replica of it"
req GET "$PRODUCTS/products"
req GET "$PRODUCTS/products/1"
before="$(field .stock)"

say "2. Order one TV: OrderPlaced → StockDecreased + DeliveryStarted → OrderCompleted"
req POST "$ORDERS/orders" '{"productId":1,"quantity":1,"customerId":"1@uengine.org","customerName":"Kim","customerAddr":"Seoul"}'
first="$(field .id)"
wait_for "$ORDERS/orders/$first" .state OrderCompleted
req GET "$ORDERS/orders/$first"
req GET "$PRODUCTS/products/1"
wait_for "$ORDERS/products/1" .stock "$((before - 1))"
req GET "$ORDERS/products/1"
echo "TV stock: $before → $((before - 1)) in products and in orders' replica"

say "3. Cancel it: 202, a request (the order is confirmed, so delivery decides) →"
say "   OrderCancelRequested → DeliveryCancelled → OrderCancelled + StockIncreased (stock restored once)"
req PATCH "$ORDERS/orders/$first" '{"state":"OrderCancelled"}'
wait_for "$ORDERS/orders/$first" .state OrderCancelled
wait_for "$PRODUCTS/products/1" .stock "$before"
req GET "$PRODUCTS/products/1"
req PATCH "$ORDERS/orders/$first" '{"state":"OrderCancelled"}'
echo "(a second cancel is refused with 409)"

say "4. Order 100 TVs: ProductOutOfStock → OrderCancelled → DeliveryCancelled, stock untouched"
req POST "$ORDERS/orders" '{"productId":1,"quantity":100,"customerId":"1@uengine.org","customerAddr":"Seoul"}'
second="$(field .id)"
wait_for "$ORDERS/orders/$second" .state OrderCancelled
wait_for "$DELIVERY/deliveries?orderId=$second" '.[0].deliveryState' DeliveryCancelled
req GET "$ORDERS/orders/$second"
req GET "$DELIVERY/deliveries?orderId=$second"
req GET "$PRODUCTS/products/1"

say "5. The timelines (GET /orders/{id}/events): who did what, caused by which event"
for id in "$first" "$second"; do
  printf '\n\033[36m$ curl %s\033[0m\n' "$ORDERS/orders/$id/events"
  curl -sS "$ORDERS/orders/$id/events" |
    jq -r '.[] | "  \(.timestamp)  \(.source | . + "        " | .[:9]) \(.eventType | . + "                  " | .[:18]) initiator=\(.initiator // "-")  eventId=\(.eventId[:8])  causedBy=\((.causationId // "-")[:8])"'
done
echo
say "done: TV stock is $(curl -sS "$PRODUCTS/products/1" | jq .stock) (was $before)"
