package api

import (
	"context"
	"net/http"

	"github.com/go-chi/chi/v5"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
)

// KEKAdmin rotates and retires KEKs (internal/app); each call checks the
// principal is an admin over "*".
type KEKAdmin interface {
	KEKStatus(ctx context.Context, p *kms.Principal, count bool) (*client.KEKStatus, error)
	RotateKEK(ctx context.Context, p *kms.Principal) (*client.KEKStatus, error)
	RetireKEK(ctx context.Context, p *kms.Principal, id string) (*client.KEKStatus, error)
}

func (s *Server) kekAdmin(w http.ResponseWriter, r *http.Request) bool {
	if err := eventFrom(r).principal.AuthorizeAll("manage the KEKs"); err != nil {
		writeError(w, r, err)
		return false
	}
	if s.opts.KEK == nil {
		writeError(w, r, kms.Errorf(kms.KindUnavailable, "this kmsd cannot rotate its KEK"))
		return false
	}
	return true
}

func (s *Server) kekStatus(w http.ResponseWriter, r *http.Request) {
	if !s.kekAdmin(w, r) {
		return
	}
	count := false
	switch r.URL.Query().Get("count") {
	case "", "false":
	case "true":
		count = true
	default:
		writeError(w, r, kms.Errorf(kms.KindInvalid, "query parameter count must be true or false"))
		return
	}
	st, err := s.opts.KEK.KEKStatus(r.Context(), eventFrom(r).principal, count)
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *Server) kekRotate(w http.ResponseWriter, r *http.Request) {
	if !s.kekAdmin(w, r) {
		return
	}
	st, err := s.opts.KEK.RotateKEK(r.Context(), eventFrom(r).principal)
	if err != nil {
		writeError(w, r, err)
		return
	}
	w.Header().Set("Location", "/v1/kek")
	writeJSON(w, http.StatusAccepted, st)
}

func (s *Server) kekRetire(w http.ResponseWriter, r *http.Request) {
	if !s.kekAdmin(w, r) {
		return
	}
	st, err := s.opts.KEK.RetireKEK(r.Context(), eventFrom(r).principal, chi.URLParam(r, "id"))
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}
