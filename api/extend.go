package api

import (
	"net/http"

	"github.com/go-chi/chi/v5"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/wire"
)

// galoisKeys answers POST .../evaluation-keys: the Galois keys of the
// asked rotations, generated when the version lacks them.
func (s *Server) galoisKeys(w http.ResponseWriter, r *http.Request) {
	n, err := versionParam(r)
	if err != nil {
		writeError(w, r, err)
		return
	}
	var req client.GaloisKeysRequest
	if !readBody(w, r, &req, false) {
		return
	}
	name := chi.URLParam(r, "name")
	pending(r, http.StatusOK)
	res, job, err := s.call(r).GaloisKeys(r.Context(), s.opts.Background, s.backgroundRecord(r), name, n, req.Rotations, req.Conjugation)
	if err != nil {
		writeError(w, r, err)
		return
	}
	if job != nil {
		eventFrom(r).version = job.Version
		s.accepted(w, r, job)
		return
	}
	eventFrom(r).version = res.Version
	writeJSON(w, http.StatusOK, client.GaloisKeysResult{Key: name, Version: res.Version, GaloisKeys: res.Galois, Generated: res.Generated, ExtensionSequence: res.Sequence})
}

// switchingKey answers POST .../switching-keys: the switching key from the
// path's version to a later one, generated the first time.
func (s *Server) switchingKey(w http.ResponseWriter, r *http.Request) {
	n, err := versionParam(r)
	if err != nil {
		writeError(w, r, err)
		return
	}
	if n == 0 {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "name the version the ciphertexts to re-key are under")
		return
	}
	var req client.SwitchingKeyRequest
	if !readBody(w, r, &req, false) {
		return
	}
	if req.ToVersion == 0 {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "to_version is required: the later version to re-key ciphertexts into")
		return
	}
	name := chi.URLParam(r, "name")
	eventFrom(r).version = n
	pending(r, http.StatusOK)
	res, err := s.call(r).SwitchingKey(r.Context(), name, n, req.ToVersion)
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, client.SwitchingKeyResult{Key: name, Version: n, SwitchingKey: *res.Switching, Generated: res.Generated, ExtensionSequence: res.Sequence})
}

// extension serves a version's signed manifest extension.
func (s *Server) extension(w http.ResponseWriter, r *http.Request) {
	n, err := versionParam(r)
	if err != nil {
		writeError(w, r, err)
		return
	}
	v, err := s.svc.Extension(r.Context(), chi.URLParam(r, "name"), n)
	if err != nil {
		writeError(w, r, err)
		return
	}
	eventFrom(r).version = v.Number
	if v.Extension == nil {
		w.WriteHeader(http.StatusNoContent) // kmsd made no key for it after its manifest
		return
	}
	writeJSON(w, http.StatusOK, wire.SignedExtension{Document: v.Extension, Algorithm: kms.IdentityKind, IdentityVersion: v.ExtensionSigBy, Context: kms.ExtensionContext, Signature: v.ExtensionSig})
}
