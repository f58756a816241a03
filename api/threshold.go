package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
)

// createThresholdKey answers POST /v1/keys for a threshold policy: this
// node coordinates the setup with the parties (synchronously: every party
// commits version 1, or none does).
func (s *Server) createThresholdKey(w http.ResponseWriter, r *http.Request, name, kind string, p kms.Policy) {
	res, err := s.call(r).CreateThresholdKey(r.Context(), name, kind, p)
	if err != nil {
		writeError(w, r, err)
		return
	}
	s.thresholdDone(w, r, name, res)
}

// rotateThreshold answers POST .../rotate for a threshold key: a new setup
// among its parties.
func (s *Server) rotateThreshold(w http.ResponseWriter, r *http.Request, name string) {
	res, err := s.call(r).RotateThreshold(r.Context(), name)
	if err != nil {
		writeError(w, r, err)
		return
	}
	s.thresholdDone(w, r, name, res)
}

func (s *Server) thresholdDone(w http.ResponseWriter, r *http.Request, name string, res *kms.ThresholdSetupResult) {
	k, vs, _, err := s.svc.GetKey(r.Context(), name, res.Version+1, 1)
	if err != nil {
		writeError(w, r, err)
		return
	}
	eventFrom(r).version = res.Version
	if r.URL.Path == "/v1/keys" {
		w.Header().Set("Location", "/v1/keys/"+url.PathEscape(k.Name))
		writeJSON(w, http.StatusCreated, toKey(k, vs, 0))
		return
	}
	w.Header().Set("Location", fmt.Sprintf("/v1/keys/%s/versions/%d/public-key", url.PathEscape(k.Name), res.Version))
	writeJSON(w, http.StatusCreated, toVersion(k, vs[0]))
}

// thresholdDecrypt answers POST .../threshold-decrypt: t parties' partial
// decryptions of an attested ciphertext towards the requester's key.
func (s *Server) thresholdDecrypt(w http.ResponseWriter, r *http.Request) {
	name, n, limit, ok := s.decryptionOf(w, r, "the body must be application/json: ciphertext (an envelope) and public_key")
	if !ok {
		return
	}
	// The envelope's ciphertext and the requester's public key (two
	// polynomials over QP: at most twice a ciphertext), in base64.
	bodyLimit := (limit+2*limit)/3*4 + 128<<10
	body, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, bodyLimit))
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		writeProblem(w, r, http.StatusRequestEntityTooLarge, ProbBodyTooLarge, fmt.Sprintf("a threshold decryption request for these parameters is at most %d bytes", bodyLimit))
		return
	}
	if err != nil {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "the body could not be read")
		return
	}
	eventFrom(r).bytesIn = len(body)
	var req struct {
		Ciphertext json.RawMessage         `json:"ciphertext"`
		PublicKey  []byte                  `json:"public_key"`
		Requester  *kms.RequesterSignature `json:"requester"`
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil || dec.More() || len(req.Ciphertext) == 0 || len(req.PublicKey) == 0 {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "the body is {\"ciphertext\": ENVELOPE, \"public_key\": BASE64}")
		return
	}
	env, err := kms.ParseEnvelope(req.Ciphertext, int(limit))
	if err != nil {
		writeError(w, r, err)
		return
	}
	pending(r, http.StatusOK)
	res, err := s.call(r).ThresholdDecrypt(r.Context(), name, n, env, req.PublicKey, req.Requester)
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, client.ThresholdDecryptResult{Key: name, Version: res.Version, Parties: res.Parties, Active: res.Active, Partials: res.Partials, Precision: res.Precision})
}
