# The systemd units of deploy/ checked with systemd-analyze verify (skipped without it).
add_test(NAME test_units COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/test_units.sh
         ${PROJECT_SOURCE_DIR}/deploy)
set_tests_properties(test_units PROPERTIES LABELS integration TIMEOUT 60 SKIP_RETURN_CODE 77)
