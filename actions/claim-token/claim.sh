#!/usr/bin/env bash
# The two halves of claiming a Kiln fork pull request token, run by action.yml:
#   claim.sh claim      POST <KILN_URL>/claim for this run; writes challenge-code and
#                       exchange-url to $GITHUB_OUTPUT (the URL masked: it is the secret)
#   claim.sh exchange   polls <KILN_EXCHANGE_URL> until Kiln has seen the proof; writes
#                       DEPOT_TOKEN to $GITHUB_ENV (masked)
# Needs bash, curl and sed, which every GitHub-hosted runner has.
set -euo pipefail

die() { echo "::error::$*" >&2; exit 1; }

# A string field of the compact JSON object Kiln answers.
field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" <<<"$2"; }

claim() {
  : "${KILN_URL:?set the kiln-url input}"
  [ "${GITHUB_EVENT_NAME:-}" = pull_request ] \
    || die "Kiln issues fork pull request tokens only to pull_request runs (this is ${GITHUB_EVENT_NAME:-unknown})"
  local body response status
  body=$(printf '{"aud":"%s","eventName":"pull_request","repo":"%s","runID":"%s","attempt":"%s"}' \
    "${KILN_AUDIENCE:-https://depot.dev}" "$GITHUB_REPOSITORY" "$GITHUB_RUN_ID" "${GITHUB_RUN_ATTEMPT:-1}")
  response=$(curl -sS --max-time 30 -w '\n%{http_code}' -H 'content-type: application/json' \
    --data "$body" "${KILN_URL%/}/claim") || die "could not reach ${KILN_URL%/}/claim"
  status=${response##*$'\n'}
  response=${response%$'\n'*}
  [ "$status" = 200 ] || die "Kiln refused the claim (HTTP $status): $(field error "$response")"
  local code url
  code=$(field challengeCode "$response")
  url=$(field exchangeURL "$response")
  [ -n "$code" ] && [ -n "$url" ] || die "Kiln's answer is not a claim: $response"
  echo "::add-mask::$url"
  echo "Kiln OIDC challenge $code"
  {
    echo "challenge-code=$code"
    echo "exchange-url=$url"
  } >>"$GITHUB_OUTPUT"
}

exchange() {
  : "${KILN_EXCHANGE_URL:?the claim step did not run}"
  local deadline=$((SECONDS + ${KILN_TIMEOUT_SECONDS:-90})) response status
  while :; do
    response=$(curl -sS --max-time 30 -X POST -H 'content-length: 0' -w '\n%{http_code}' \
      "$KILN_EXCHANGE_URL") || response=$'\n000'
    status=${response##*$'\n'}
    response=${response%$'\n'*}
    case "$status" in
      200)
        echo "::add-mask::$response"
        echo "DEPOT_TOKEN=$response" >>"$GITHUB_ENV"
        echo "Kiln issued a token for this run"
        return 0
        ;;
      202 | 429 | 503 | 000) ;;
      *) die "Kiln refused the exchange (HTTP $status): $(field error "$response")" ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] || die "Kiln did not see the challenge artifact within ${KILN_TIMEOUT_SECONDS:-90} s"
    sleep 1
  done
}

case "${1:-}" in
  claim) claim ;;
  exchange) exchange ;;
  *) die "usage: claim.sh claim|exchange" ;;
esac
