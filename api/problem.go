package api

import (
	"encoding/json"
	"errors"
	"net/http"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
)

// ProblemBase prefixes every problem type. Types are stable: clients may
// switch on them.
const ProblemBase = "urn:kmsd:problem:"

// Problem types.
const (
	ProbInvalid          = "invalid-request"
	ProbBodyTooLarge     = "body-too-large"
	ProbUnsupportedMedia = "unsupported-media-type"
	ProbUnauthenticated  = "unauthenticated"
	ProbTokenExpired     = "token-expired"
	ProbForbidden        = "forbidden"
	ProbNotFound         = "not-found"
	ProbMethod           = "method-not-allowed"
	ProbAlreadyExists    = "already-exists"
	ProbKeyState         = "failed-precondition"
	ProbUnavailable      = "unavailable"
	ProbTooLarge         = "too-large"
	ProbBusy             = "busy"
	ProbRateLimited      = "rate-limited"
	ProbRange            = "range-not-satisfiable"
	ProbPrecondition     = "precondition-failed"
	ProbInternal         = "internal"
	ProbBlobCorrupt      = "blob-corrupt"
	ProbStoreTampered    = "store-tampered"
	ProbOutcomeUnknown   = "outcome-unknown"
	ProbNotAcceptable    = "not-acceptable"
)

// outcomeUnknownDetail is what a client is told when the store did not
// say whether its change committed.
const outcomeUnknownDetail = "the store did not say whether this change was made (etcd lost its leader or the connection and did not answer in time): it may have been; read the resource, or find this request id in the audit log, before retrying"

var problemTitles = map[string]string{
	ProbInvalid:          "The request is invalid",
	ProbBlobCorrupt:      "The stored blob does not match its digest",
	ProbStoreTampered:    "A stored record failed its integrity check",
	ProbBodyTooLarge:     "The request body is too large",
	ProbUnsupportedMedia: "Unsupported media type",
	ProbUnauthenticated:  "Authentication required",
	ProbTokenExpired:     "The bearer token has expired",
	ProbForbidden:        "Not allowed",
	ProbNotFound:         "Not found",
	ProbMethod:           "Method not allowed",
	ProbAlreadyExists:    "Already exists",
	ProbKeyState:         "Not possible in the current state (the detail says why)",
	ProbUnavailable:      "Service unavailable",
	ProbTooLarge:         "The result would be too large",
	ProbBusy:             "Too many operations of this kind at once",
	ProbRateLimited:      "Too many requests",
	ProbRange:            "Range not satisfiable",
	ProbPrecondition:     "Precondition failed",
	ProbInternal:         "Internal error",
	ProbOutcomeUnknown:   "The outcome of the change is unknown",
	ProbNotAcceptable:    "The client did not ask for a form it can read",
}

var kindProblems = map[kms.Kind]struct {
	status int
	typ    string
}{
	kms.KindInvalid:            {http.StatusBadRequest, ProbInvalid},
	kms.KindNotFound:           {http.StatusNotFound, ProbNotFound},
	kms.KindAlreadyExists:      {http.StatusConflict, ProbAlreadyExists},
	kms.KindFailedPrecondition: {http.StatusConflict, ProbKeyState},
	kms.KindUnauthenticated:    {http.StatusUnauthorized, ProbUnauthenticated},
	kms.KindPermissionDenied:   {http.StatusForbidden, ProbForbidden},
	kms.KindUnavailable:        {http.StatusServiceUnavailable, ProbUnavailable},
	kms.KindInternal:           {http.StatusInternalServerError, ProbInternal},
	kms.KindTooLarge:           {http.StatusRequestEntityTooLarge, ProbTooLarge},
	kms.KindExhausted:          {http.StatusTooManyRequests, ProbBusy},
	kms.KindExpired:            {http.StatusUnauthorized, ProbTokenExpired},
}

// writeProblem writes an RFC 9457 problem document.
func writeProblem(w http.ResponseWriter, r *http.Request, status int, typ, detail string) {
	ev := eventFrom(r)
	p := client.Problem{Type: ProblemBase + typ, Title: problemTitles[typ], Status: status, Detail: detail, Instance: safePath(r.URL.Path)}
	if ev != nil {
		p.RequestID = ev.id
		ev.problem = typ
	}
	if status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="kmsd"`)
	}
	if (status == http.StatusServiceUnavailable || status == http.StatusTooManyRequests) && w.Header().Get("Retry-After") == "" {
		w.Header().Set("Retry-After", "1")
	}
	w.Header().Set("Content-Type", "application/problem+json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(p)
}

// writeError maps a domain error to its problem. Internal causes go to the
// request's log event, never to the client.
func writeError(w http.ResponseWriter, r *http.Request, err error) {
	var t *kms.TamperError
	if errors.As(err, &t) {
		// Whatever the operation: a record kmsd keeps was changed
		// outside it. The log gets the cause, the audit record the
		// record's path, the client a fixed text.
		if ev := eventFrom(r); ev != nil {
			ev.err = err
			if ev.rec != nil {
				ev.rec.Tampered = clipField(t.Path, 160)
			}
		}
		writeProblem(w, r, http.StatusInternalServerError, ProbStoreTampered, kms.TamperMessage)
		return
	}
	if errors.Is(err, kms.ErrOutcomeUnknown) {
		// The request's record went with the change, or did not: the
		// log holds it exactly when the change was made, so none is
		// added for this answer.
		if ev := eventFrom(r); ev != nil {
			ev.err, ev.outcomeUnknown = err, true
		}
		writeProblem(w, r, http.StatusServiceUnavailable, ProbOutcomeUnknown, outcomeUnknownDetail)
		return
	}
	kp := kindProblems[kms.KindOf(err)]
	if kp.status >= 500 {
		if ev := eventFrom(r); ev != nil {
			ev.err = err
		}
	}
	writeProblem(w, r, kp.status, kp.typ, kms.PublicMessage(err))
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
