package api

import (
	"net/http"

	"github.com/go-chi/chi/v5"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
)

// call is the service for request r: its state changes commit with r's
// audit record (nil when auditing is off).
func (s *Server) call(r *http.Request) kms.Call {
	var rec *kms.AuditRecord
	if ev := eventFrom(r); ev != nil {
		rec = ev.rec
	}
	return s.svc.For(rec)
}

// backgroundRecord is the audit record a 202 operation's change commits
// with, in the server's background context: a copy of the request's (whose
// own record, status 202, is written when the answer is).
func (s *Server) backgroundRecord(r *http.Request) *kms.AuditRecord {
	ev := eventFrom(r)
	if ev == nil || ev.rec == nil {
		return nil
	}
	rec := *ev.rec
	rec.Operation = operation(r) + " (completed in the background)"
	rec.Status = http.StatusCreated
	rec.Committed = false
	return &rec
}

func toOperation(j *kms.Job) client.Operation {
	return client.Operation{ID: j.ID, State: j.State, Key: j.Key, Version: j.Version, Error: j.Error,
		Progress: client.Progress{Done: j.Done, Total: j.Total, Bytes: j.Bytes}}
}

// accepted answers 202 for work that goes on in the background.
func (s *Server) accepted(w http.ResponseWriter, r *http.Request, j *kms.Job) {
	w.Header().Set("Location", "/v1/operations/"+j.ID)
	writeJSON(w, http.StatusAccepted, toOperation(j))
}

func (s *Server) operation(w http.ResponseWriter, r *http.Request) {
	j, err := s.svc.GetJob(chi.URLParam(r, "id"))
	if err != nil {
		writeError(w, r, err)
		return
	}
	ev := eventFrom(r)
	ev.key = j.Key
	if err := ev.principal.Authorize(kms.PermReadKey, j.Key); err != nil {
		writeProblem(w, r, http.StatusNotFound, ProbNotFound, "no such operation")
		return
	}
	writeJSON(w, http.StatusOK, toOperation(j))
}
